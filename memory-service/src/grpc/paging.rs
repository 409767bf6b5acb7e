//! Filling a listing page within a byte budget as well as a count.
//!
//! One stored message can encode to ~74 KB, so `page_size` alone lets a page
//! reach ~37 MB: past every client's default receive limit, and a few such
//! calls at once exhaust the pod's memory. A page therefore also stops before
//! the item that would take its encoding past `MEMORY_MAX_PAGE_BYTES`.
//!
//! Sizes are prost's exact `encoded_len` of each item as the response carries
//! it, not a sum of stored column sizes computed in SQL: the stored JSON and
//! jsonb differ from the wire encoding in both directions, and TOAST
//! compression hides how large a stored value really is, so only the encoded
//! size bounds what the client receives. The SQL still reads at most
//! `page_size + 1` rows, and rows are read one at a time so that the rows past
//! the budget are never held.

use futures::{Stream, TryStreamExt};

/// A page's items, and the sort key of the last one when another page follows.
#[derive(Debug, Clone, PartialEq)]
pub struct Filled<T, K> {
    pub items: Vec<T>,
    pub next: Option<K>,
}

/// The field number of the repeated field that holds a page's items
/// (`messages`, `conversations`): it decides the size of each item's tag.
const ITEMS_FIELD: u32 = 1;

/// Reads `rows` until the page holds `page_size` items or the next item would
/// take the page past `budget` bytes, counting `reserve` bytes for the page
/// token. The first item is always taken (alone it may pass the budget), so
/// paging always advances. `convert` turns a row into its item and sort key.
/// `next` is the last item's key when a row was left unread.
pub async fn fill<R, T, K, E>(
    mut rows: impl Stream<Item = Result<R, E>> + Unpin,
    page_size: u32,
    budget: usize,
    reserve: usize,
    mut convert: impl FnMut(R) -> (T, K),
) -> Result<Filled<T, K>, E>
where
    T: prost::Message,
{
    let mut items = Vec::new();
    let mut last = None;
    let mut used = reserve;
    while let Some(row) = rows.try_next().await? {
        if items.len() >= page_size as usize {
            return Ok(Filled { items, next: last });
        }
        let (item, key) = convert(row);
        let size = prost::encoding::message::encoded_len(ITEMS_FIELD, &item);
        if !items.is_empty() && used + size > budget {
            return Ok(Filled { items, next: last });
        }
        used += size;
        items.push(item);
        last = Some(key);
    }
    Ok(Filled { items, next: None })
}

/// What a page token of `token`'s length adds to a response: tag, length and
/// the token itself (field 2 in both listing responses).
pub fn token_reserve(token: &str) -> usize {
    prost::encoding::string::encoded_len(2, &token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use maitre_api::memory::v1 as pb;
    use prost::Message as _;

    /// An item that grows with `n`.
    fn item(n: usize) -> pb::EmotionPoint {
        pb::EmotionPoint {
            label: "x".repeat(n),
            ..Default::default()
        }
    }

    async fn page(
        sizes: &[usize],
        page_size: u32,
        budget: usize,
    ) -> Filled<pb::EmotionPoint, usize> {
        let rows = futures::stream::iter(
            sizes
                .iter()
                .copied()
                .enumerate()
                .map(Ok::<_, std::convert::Infallible>),
        );
        match fill(rows, page_size, budget, 0, |(i, n)| (item(n), i)).await {
            Ok(filled) => filled,
            Err(never) => match never {},
        }
    }

    fn wire(n: usize) -> usize {
        prost::encoding::message::encoded_len(ITEMS_FIELD, &item(n))
    }

    #[tokio::test]
    async fn stops_before_the_item_that_would_pass_the_budget() {
        let budget = wire(200) * 2 + wire(200) / 2;
        let filled = page(&[200, 200, 200, 200], 10, budget).await;
        assert_eq!(filled.items.len(), 2);
        assert_eq!(filled.next, Some(1));
        let encoded = pb::GetEmotionHistoryResponse {
            points: filled.items,
        }
        .encoded_len();
        assert!(encoded <= budget, "{encoded} > {budget}");
    }

    #[tokio::test]
    async fn an_item_that_fits_exactly_is_taken() {
        let filled = page(&[200, 200, 200], 10, wire(200) * 2).await;
        assert_eq!(filled.items.len(), 2);
        assert_eq!(filled.next, Some(1));
    }

    #[tokio::test]
    async fn the_first_item_is_taken_even_over_the_budget() {
        let filled = page(&[5000, 10], 10, 100).await;
        assert_eq!(filled.items.len(), 1);
        assert_eq!(filled.next, Some(0));
        let alone = page(&[5000], 10, 100).await;
        assert_eq!((alone.items.len(), alone.next), (1, None));
    }

    #[tokio::test]
    async fn page_size_still_bounds_the_count() {
        let filled = page(&[1, 1, 1, 1], 3, usize::MAX).await;
        assert_eq!((filled.items.len(), filled.next), (3, Some(2)));
        let exact = page(&[1, 1, 1], 3, usize::MAX).await;
        assert_eq!((exact.items.len(), exact.next), (3, None));
        let empty = page(&[], 3, usize::MAX).await;
        assert_eq!((empty.items.len(), empty.next), (0, None));
    }

    #[tokio::test]
    async fn the_token_reserve_counts_against_the_budget() {
        let rows = futures::stream::iter([Ok::<_, std::convert::Infallible>(200), Ok(200)]);
        let budget = wire(200) * 2;
        let filled = fill(rows, 10, budget, 1, |n| (item(n), n)).await;
        assert_eq!(filled.map(|f| f.items.len()).ok(), Some(1));
    }
}
