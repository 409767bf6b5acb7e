"""Checks of everything under deploy/ without a cluster, a database or a
Docker engine; run with `python3 -m deploycheck` from the repository root
(scripts/validate-deploy.sh installs the pinned tools and does that). One
module per check; tests/ feeds each of them bad manifests."""
