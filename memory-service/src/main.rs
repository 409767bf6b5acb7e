use clap::Parser;
use maitre_runtime::{launch, shutdown};
use memory_service::{
    config::{Cli, Command, RENAMED_VARIABLES},
    startup::{self, Application},
};

/// Many small, short-lived allocations per call (rows, messages, protobuf):
/// mimalloc serves them with less work than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli { command, settings } = Cli::parse();
    let log = settings.common.log.clone();
    launch::run_main("memory-service", log, &RENAMED_VARIABLES, async move {
        match command.unwrap_or(Command::Serve) {
            Command::Migrate => startup::migrate(&settings).await,
            Command::Serve => {
                let app = Application::build(settings).await?;
                app.run_until_stopped(shutdown::signal()).await
            }
        }
    })
    .await
}
