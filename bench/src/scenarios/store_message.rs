//! store-message: each client stores user messages with an emotion in a
//! conversation of its own.

use anyhow::Result;
use maitre_api::memory::v1::{self as memory, memory_service_client::MemoryServiceClient};
use tonic::{Status, transport::Channel};

use super::{Endpoints, memory_client, message};

pub struct StoreClient {
    memory: MemoryServiceClient<Channel>,
    conversation: String,
    user: String,
}

impl StoreClient {
    pub async fn new(endpoints: &Endpoints, run: u64, index: usize) -> Result<Self> {
        Ok(Self {
            memory: memory_client(endpoints).await?,
            // Unknown ids are created by the first message.
            conversation: uuid::Uuid::now_v7().to_string(),
            user: format!("bench-{run}-{index}"),
        })
    }

    pub async fn op(&mut self) -> Result<(), Status> {
        self.memory
            .store_message(message(
                &self.conversation,
                &self.user,
                memory::Role::User,
                true,
            ))
            .await?;
        Ok(())
    }
}
