//! The one collation layer: how the token sequences of a batch are laid out for a forward pass.
//!
//! Everything the model runs on comes through here: preference examples (a prompt with one or
//! more responses, [`ScoredGroup`]), single scored sequences ([`ScoredSeq`]), and plain
//! sequences with nothing scored (reward models, embeddings, generation prompts). The result,
//! [`Collated`], says which token sits where, at which position, and which tokens may attend
//! to which; the model turns it into tensors (`model::inputs::AttentionInputs::for_batch`) and
//! nothing else builds batches.
//!
//! Every [`Layout`] gives the same log-probs (to float rounding; tested); layouts differ only in
//! how many token positions a forward pass computes.

use crate::data::TokenizedExample;
use crate::error::{Error, Result};

/// One sequence to score: `ids[completion_start..]` are the scored tokens (the completion,
/// EOS included); the log-prob of token t comes from the logits at t-1.
#[derive(Clone, Debug)]
pub struct ScoredSeq {
    pub ids: Vec<u32>,
    pub completion_start: usize,
}

/// A prompt and the responses scored after it.
#[derive(Clone, Copy, Debug)]
pub struct ScoredGroup<'a> {
    pub prompt: &'a [u32],
    pub responses: &'a [Vec<u32>],
}

/// Which side padding goes on in a batch. Results do not depend on it (tested).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaddingSide {
    Left,
    Right,
}

/// How the sequences of a batch are laid out for the forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Lay out a prompt and all its responses as one unit `[prompt, r1, r2, ...]`, in which
    /// each response attends to the prompt and to itself only, with positions restarting after
    /// the prompt. The prompt is computed once instead of once per response.
    pub share_prompt: bool,
    /// Concatenate all units into one row (each attending only within itself) instead of
    /// padding every unit to the longest one.
    pub padding_free: bool,
    /// Side of the padding when not padding-free.
    pub padding_side: PaddingSide,
}

impl Layout {
    /// One padded row per sequence: the layout of TRL and transformers.
    pub const PADDED: Layout = Layout {
        share_prompt: false,
        padding_free: false,
        padding_side: PaddingSide::Right,
    };
    /// Shared prompts, packed without padding: the fastest exact layout.
    pub const PACKED: Layout = Layout {
        share_prompt: true,
        padding_free: true,
        padding_side: PaddingSide::Right,
    };
}

impl Default for Layout {
    fn default() -> Self {
        Layout::PACKED
    }
}

/// The segment of a padding token.
pub const PAD: u32 = u32::MAX;

/// A batch laid out for one forward pass: a `[rows, cols]` grid of token ids with their
/// positions and segments, the attention blocks, and the scored tokens.
///
/// Attention: a token sees itself, and earlier tokens of its block that are not padding and
/// are either the prompt (segment 0) or of its own segment (its own response).
#[derive(Clone, Debug)]
pub struct Collated {
    pub rows: usize,
    pub cols: usize,
    /// `rows · cols` token ids (padding: the pad id given, 0 for scored batches).
    pub ids: Vec<u32>,
    /// `rows · cols` rotary positions (padding: 0).
    pub positions: Vec<usize>,
    /// `rows · cols` segments: 0 = prompt, k = response k, [`PAD`] = padding.
    pub segments: Vec<u32>,
    /// Column ranges `(start, len)` of the attention blocks of every row, in order, covering
    /// `0..cols`: one block per packed unit in a padding-free row, one block otherwise.
    pub blocks: Vec<(usize, usize)>,
    /// Whether this is one padding-free row of packed units.
    pub packed: bool,
    /// For each scored token, the flat index (`row · cols + col`) of the position predicting it.
    pub scored: Vec<u32>,
    /// The scored tokens.
    pub targets: Vec<u32>,
    /// Response s owns `targets[offsets[s]..offsets[s + 1]]`.
    pub offsets: Vec<usize>,
}

impl Collated {
    /// Whether query `i` may attend key `j` (columns of row `row`).
    pub fn allowed(&self, row: usize, i: usize, j: usize) -> bool {
        let seg = &self.segments[row * self.cols..(row + 1) * self.cols];
        i == j || seg[i] != PAD && seg[j] != PAD && j <= i && (seg[j] == 0 || seg[j] == seg[i])
    }

    /// Positions of each row.
    pub fn position_rows(&self) -> Vec<Vec<usize>> {
        self.positions.chunks(self.cols.max(1)).map(<[usize]>::to_vec).collect()
    }

    /// Token positions one forward pass computes (padding included).
    pub fn computed_positions(&self) -> usize {
        self.rows * self.cols
    }
}

/// One attention unit: token ids, positions, and the segment of each token.
struct Unit {
    ids: Vec<u32>,
    positions: Vec<usize>,
    segment: Vec<u32>,
}

/// Lay out units as one padding-free row, or one padded row each (`pad` id for padding).
fn lay_out(units: &[Unit], layout: Layout, pad: u32) -> Collated {
    let mut c = Collated {
        rows: 0,
        cols: 0,
        ids: Vec::new(),
        positions: Vec::new(),
        segments: Vec::new(),
        blocks: Vec::new(),
        packed: layout.padding_free,
        scored: Vec::new(),
        targets: Vec::new(),
        offsets: vec![0],
    };
    if layout.padding_free {
        for u in units {
            c.blocks.push((c.ids.len(), u.ids.len()));
            c.ids.extend_from_slice(&u.ids);
            c.positions.extend_from_slice(&u.positions);
            c.segments.extend_from_slice(&u.segment);
        }
        c.rows = 1;
        c.cols = c.ids.len();
    } else {
        let t = units.iter().map(|u| u.ids.len()).max().unwrap_or(0);
        c.rows = units.len();
        c.cols = t;
        c.ids = vec![pad; units.len() * t];
        c.positions = vec![0; units.len() * t];
        c.segments = vec![PAD; units.len() * t];
        for (b, u) in units.iter().enumerate() {
            let s = b * t + shift(layout, t, u.ids.len());
            c.ids[s..s + u.ids.len()].copy_from_slice(&u.ids);
            c.positions[s..s + u.ids.len()].copy_from_slice(&u.positions);
            c.segments[s..s + u.ids.len()].copy_from_slice(&u.segment);
        }
        c.blocks.push((0, t));
    }
    c
}

/// Where a unit of `len` tokens starts in a padded row of `t`.
fn shift(layout: Layout, t: usize, len: usize) -> usize {
    match layout.padding_side {
        PaddingSide::Left => t - len,
        PaddingSide::Right => 0,
    }
}

/// Lay out the responses of every group, responses in order, group after group, for scoring.
pub fn collate(groups: &[ScoredGroup], layout: Layout) -> Result<Collated> {
    if groups.is_empty() {
        return Err(Error::msg("sequence_logps: empty batch"));
    }
    // Units, and for each scored token the (unit, index in unit) of the position predicting it.
    let mut units: Vec<Unit> = Vec::new();
    let mut scored: Vec<(usize, usize)> = Vec::new();
    let mut targets = Vec::new();
    let mut offsets = vec![0usize];
    let mut seq = 0;
    for g in groups {
        let p = g.prompt.len();
        for r in g.responses {
            if p == 0 || r.is_empty() {
                return Err(Error::msg(format!(
                    "sequence {seq}: completion_start {p} must be in 1..={} (the first token has no logits to score it)",
                    p + r.len()
                )));
            }
            seq += 1;
        }
        let per_unit: Vec<&[Vec<u32>]> = if layout.share_prompt {
            vec![g.responses]
        } else {
            g.responses.chunks(1).collect()
        };
        for rs in per_unit {
            let mut u = Unit {
                ids: g.prompt.to_vec(),
                positions: (0..p).collect(),
                segment: vec![0; p],
            };
            for (k, r) in rs.iter().enumerate() {
                let start = u.ids.len();
                for (t, &id) in r.iter().enumerate() {
                    scored.push((units.len(), if t == 0 { p - 1 } else { start + t - 1 }));
                    targets.push(id);
                    u.ids.push(id);
                    u.positions.push(p + t);
                    u.segment.push(k as u32 + 1);
                }
                offsets.push(targets.len());
            }
            units.push(u);
        }
    }
    let mut c = lay_out(&units, layout, 0);
    c.scored = if layout.padding_free {
        let starts: Vec<usize> = c.blocks.iter().map(|b| b.0).collect();
        scored.iter().map(|&(u, i)| (starts[u] + i) as u32).collect()
    } else {
        let t = c.cols;
        scored
            .iter()
            .map(|&(u, i)| (u * t + shift(layout, t, units[u].ids.len()) + i) as u32)
            .collect()
    };
    c.targets = targets;
    c.offsets = offsets;
    Ok(c)
}

/// Plain causal sequences, one right-padded row each (padding: `pad_id`), nothing scored:
/// what a reward head or an embedding reads.
pub fn collate_plain(seqs: &[Vec<u32>], pad_id: u32) -> Collated {
    let units: Vec<Unit> = seqs
        .iter()
        .map(|s| Unit {
            ids: s.clone(),
            positions: (0..s.len()).collect(),
            segment: vec![0; s.len()],
        })
        .collect();
    lay_out(&units, Layout::PADDED, pad_id)
}

/// Every prompt with its responses, example after example, as [`ScoredGroup`]s.
pub fn example_groups<'a>(examples: &[&'a TokenizedExample]) -> Vec<ScoredGroup<'a>> {
    examples
        .iter()
        .map(|e| ScoredGroup {
            prompt: &e.prompt_ids,
            responses: &e.responses,
        })
        .collect()
}

/// Every response of a batch as its own sequence (prompt + response), example after example,
/// and each example's offset into them.
pub fn example_sequences(examples: &[&TokenizedExample]) -> (Vec<ScoredSeq>, Vec<usize>) {
    let mut seqs = Vec::new();
    let mut offsets = vec![0];
    for e in examples {
        for r in &e.responses {
            seqs.push(ScoredSeq {
                ids: e.prompt_ids.iter().chain(r).copied().collect(),
                completion_start: e.prompt_ids.len(),
            });
        }
        offsets.push(seqs.len());
    }
    (seqs, offsets)
}

/// Token positions one forward pass over `examples` computes under `layout` (padding included),
/// without building the batch.
pub fn forward_positions(examples: &[&TokenizedExample], layout: Layout) -> usize {
    let units: Vec<usize> = examples
        .iter()
        .flat_map(|e| {
            let p = e.prompt_ids.len();
            if layout.share_prompt {
                vec![p + e.responses.iter().map(Vec::len).sum::<usize>()]
            } else {
                e.responses.iter().map(|r| p + r.len()).collect()
            }
        })
        .collect();
    if layout.padding_free {
        units.iter().sum()
    } else {
        units.len() * units.iter().copied().max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prompt_units_attend_to_the_prompt_and_their_own_response() {
        let (p, r) = (vec![5u32, 6], vec![vec![7u32, 8], vec![9u32]]);
        let g = [ScoredGroup {
            prompt: &p,
            responses: &r,
        }];
        let c = collate(&g, Layout::PACKED).unwrap();
        assert_eq!((c.rows, c.cols), (1, 5));
        assert_eq!(c.ids, vec![5, 6, 7, 8, 9]);
        assert_eq!(c.positions, vec![0, 1, 2, 3, 2], "positions restart after the prompt");
        assert_eq!(c.targets, vec![7, 8, 9]);
        assert_eq!(
            c.scored,
            vec![1, 2, 1],
            "each response's first token comes from the prompt's last"
        );
        assert_eq!(c.offsets, vec![0, 2, 3]);
        assert!(
            c.allowed(0, 4, 0) && c.allowed(0, 4, 1),
            "the second response sees the prompt"
        );
        assert!(!c.allowed(0, 4, 2) && !c.allowed(0, 4, 3), "but not the first response");
        assert!(!c.allowed(0, 2, 3), "causal");

        let left = Layout {
            padding_side: PaddingSide::Left,
            ..Layout::PADDED
        };
        let c = collate(&g, left).unwrap();
        assert_eq!((c.rows, c.cols), (2, 4));
        assert_eq!(c.ids, vec![5, 6, 7, 8, 0, 5, 6, 9]);
        assert_eq!(c.segments[4], PAD);
        assert_eq!(c.positions[4..], [0, 0, 1, 2]);
        assert_eq!(c.scored, vec![1, 2, 6]);
        assert!(
            c.allowed(1, 0, 0) && !c.allowed(1, 1, 0),
            "padding sees only itself and is seen by none"
        );
        assert_eq!(c.computed_positions(), 8, "two units padded to the longest (4)");
    }
}
