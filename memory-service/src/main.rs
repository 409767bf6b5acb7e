use clap::Parser;
use memory_service::{
    config::{Cli, Command},
    startup::{self, Application},
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli { command, settings } = Cli::parse();
    maitre_runtime::telemetry::init(settings.log_format, &settings.log_filter);
    let result = match command.unwrap_or(Command::Serve) {
        Command::Migrate => startup::migrate(&settings).await,
        Command::Serve => match Application::build(settings).await {
            Ok(app) => {
                app.run_until_stopped(maitre_runtime::shutdown::signal())
                    .await
            }
            Err(e) => Err(e),
        },
    };
    if let Err(error) = &result {
        tracing::error!(error = format!("{error:#}"), "memory-service failed");
    }
    result
}
