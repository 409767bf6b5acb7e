//! Follow-up templates cached in-process: read once, refreshed at most once
//! a minute, so planning costs no template query.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use sqlx::PgPool;
use tokio::sync::RwLock;

use crate::{domain::template::Template, store};

/// How long a loaded template set is used before it is read again.
const REFRESH_AFTER: Duration = Duration::from_secs(60);

/// The templates and when they were read.
type Loaded = Option<(Instant, Arc<Vec<Template>>)>;

#[derive(Clone, Default)]
pub struct TemplateCache {
    inner: Arc<RwLock<Loaded>>,
}

impl TemplateCache {
    pub async fn get(&self, pool: &PgPool) -> Result<Arc<Vec<Template>>, sqlx::Error> {
        if let Some((loaded, templates)) = self.inner.read().await.as_ref()
            && loaded.elapsed() < REFRESH_AFTER
        {
            return Ok(templates.clone());
        }
        let templates = Arc::new(store::templates::all(pool).await?);
        *self.inner.write().await = Some((Instant::now(), templates.clone()));
        Ok(templates)
    }
}
