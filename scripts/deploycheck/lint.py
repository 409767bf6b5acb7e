"""yamllint over every YAML file in deploy/ (config: deploy/.yamllint.yaml)."""
from .common import python_tool


def check_yaml(ctx, report, directory="deploy", config="deploy/.yamllint.yaml"):
    if report.run(python_tool("yamllint", "--strict", "-c", config, directory), "yamllint"):
        report.info("no problems")
