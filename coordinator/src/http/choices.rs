//! A request's choices (`n`) as one response: their chunks merged into one stream in
//! arrival order, or all of them collected; usage counts the prompt once and every
//! choice's completion tokens.

use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};

use crate::error::ApiError;
use crate::generation::{Chunk, Collected, Generation, Usage};

/// What a merged stream of choices yields.
pub(crate) enum ChoiceEvent {
    /// A chunk of choice `index`.
    Chunk(u32, Chunk),
    /// A choice failed; the stream ends after this (the other choices are dropped, which
    /// releases them).
    Failed(ApiError),
    /// Every choice ended; the request's usage.
    Done(Usage),
}

/// Usage of a request whose choices had `usages` (the prompt counted once).
fn total(usages: &[Usage]) -> Usage {
    Usage {
        prompt_tokens: usages.first().map_or(0, |u| u.prompt_tokens),
        completion_tokens: usages.iter().map(|u| u.completion_tokens).sum(),
        cached_tokens: usages.first().map_or(0, |u| u.cached_tokens),
    }
}

/// The chunks of every choice as they come, then [`ChoiceEvent::Done`]; or, at the first
/// error, [`ChoiceEvent::Failed`] and the end.
pub(crate) fn merged(generations: Vec<Generation>) -> impl Stream<Item = ChoiceEvent> + Send {
    let usages: Arc<Mutex<Vec<(u32, Usage)>>> = Arc::default();
    let streams = generations.into_iter().enumerate().map(|(i, g)| {
        let usages = usages.clone();
        futures::stream::unfold(Some(g), move |state| {
            let usages = usages.clone();
            async move {
                let mut g = state?;
                match g.next().await {
                    Some(Ok(chunk)) => Some((Ok((i as u32, chunk)), Some(g))),
                    Some(Err(e)) => Some((Err(e), None)),
                    None => {
                        usages
                            .lock()
                            .expect("usage lock poisoned; this is a bug")
                            .push((i as u32, g.usage()));
                        None
                    }
                }
            }
        })
        .boxed()
    });
    let chunks = futures::stream::select_all(streams);
    futures::stream::unfold((Some(chunks), usages), |(chunks, usages)| async move {
        let mut chunks = chunks?;
        match chunks.next().await {
            Some(Ok((i, chunk))) => Some((ChoiceEvent::Chunk(i, chunk), (Some(chunks), usages))),
            Some(Err(e)) => Some((ChoiceEvent::Failed(e), (None, usages))),
            None => {
                let mut all = usages
                    .lock()
                    .expect("usage lock poisoned; this is a bug")
                    .clone();
                all.sort_by_key(|(i, _)| *i);
                let all: Vec<Usage> = all.into_iter().map(|(_, u)| u).collect();
                Some((ChoiceEvent::Done(total(&all)), (None, usages)))
            }
        }
    })
}

/// Every choice run to its end (non-streaming responses), in choice order, and the
/// request's usage.
pub(crate) async fn collect_all(
    generations: Vec<Generation>,
) -> Result<(Vec<Collected>, Usage), ApiError> {
    let all = futures::future::join_all(generations.into_iter().map(Generation::collect)).await;
    let all: Vec<Collected> = all.into_iter().collect::<Result<_, _>>()?;
    let usage = total(&all.iter().map(|c| c.usage).collect::<Vec<_>>());
    Ok((all, usage))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_counts_once() {
        let u = |p, c, k| Usage {
            prompt_tokens: p,
            completion_tokens: c,
            cached_tokens: k,
        };
        assert_eq!(total(&[u(10, 3, 0), u(10, 5, 8)]), u(10, 8, 0));
        assert_eq!(total(&[]), u(0, 0, 0));
    }
}
