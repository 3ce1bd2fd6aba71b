//! CTC decoding of one utterance's `[T, C]` log-probabilities: best-path (greedy) and prefix
//! beam search.

use std::collections::HashMap;

use ndarray::{ArrayView1, ArrayView2};

use crate::ops::ctc::log_add;

const NEG_INF: f64 = f64::NEG_INFINITY;

/// Best path: the most probable class of every frame, repeats collapsed, blanks dropped.
/// Ties go to the lower class index.
pub fn greedy(log_probs: ArrayView2<f32>, blank: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut prev = None;
    for row in log_probs.rows() {
        let best = argmax(row);
        if Some(best) != prev && best != blank {
            out.push(best);
        }
        prev = Some(best);
    }
    out
}

fn argmax(row: ArrayView1<f32>) -> u32 {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (k, &v) in row.iter().enumerate() {
        if v > best_value {
            best = k;
            best_value = v;
        }
    }
    best as u32
}

/// Every prefix the search has created, as a tree: a prefix is a node, its labels are the path
/// from the root. Comparing and extending prefixes is then O(1) instead of O(length).
struct PrefixTree {
    parent: Vec<u32>,
    label: Vec<u32>,
    children: HashMap<(u32, u32), u32>,
}

impl PrefixTree {
    const ROOT: u32 = 0;

    fn new() -> Self {
        PrefixTree {
            parent: vec![Self::ROOT],
            label: vec![u32::MAX],
            children: HashMap::new(),
        }
    }

    fn child(&mut self, node: u32, label: u32) -> u32 {
        let next = self.parent.len() as u32;
        let id = *self.children.entry((node, label)).or_insert(next);
        if id == next {
            self.parent.push(node);
            self.label.push(label);
        }
        id
    }

    fn last(&self, node: u32) -> Option<u32> {
        (node != Self::ROOT).then(|| self.label[node as usize])
    }

    fn labels(&self, mut node: u32) -> Vec<u32> {
        let mut out = Vec::new();
        while node != Self::ROOT {
            out.push(self.label[node as usize]);
            node = self.parent[node as usize];
        }
        out.reverse();
        out
    }
}

/// A labelling prefix with the log probability of all alignments of the frames so far that
/// produce it and end in a blank, or end in its last label.
#[derive(Clone, Copy)]
struct Prefix {
    node: u32,
    ends_blank: f64,
    ends_label: f64,
}

impl Prefix {
    fn score(&self) -> f64 {
        log_add(self.ends_blank, self.ends_label)
    }
}

/// The prefixes of the next frame, merged by labelling, in first-seen order.
#[derive(Default)]
struct NextBeam {
    prefixes: Vec<Prefix>,
    index: HashMap<u32, usize>,
}

impl NextBeam {
    fn entry(&mut self, node: u32) -> &mut Prefix {
        let slot = *self.index.entry(node).or_insert(self.prefixes.len());
        if slot == self.prefixes.len() {
            self.prefixes.push(Prefix {
                node,
                ends_blank: NEG_INF,
                ends_label: NEG_INF,
            });
        }
        &mut self.prefixes[slot]
    }
}

/// CTC prefix beam search: the `beam` most probable labellings with their log probability summed
/// over alignments, best first. Each frame considers only its `beam` most probable classes.
/// A `beam` of 0 is treated as 1. With a beam wide enough to keep every prefix, the scores are the
/// exact labelling probabilities.
// Mirrors WeNet's ctc_prefix_beam_search (wenet/transformer/search.py).
pub fn prefix_beam_search(
    log_probs: ArrayView2<f32>,
    beam: usize,
    blank: u32,
) -> Vec<(Vec<u32>, f32)> {
    let beam = beam.max(1);
    let mut tree = PrefixTree::new();
    let mut current = vec![Prefix {
        node: PrefixTree::ROOT,
        ends_blank: 0.0,
        ends_label: NEG_INF,
    }];
    let mut candidates: Vec<u32> = Vec::new();
    for row in log_probs.rows() {
        top_classes(row, beam, &mut candidates);
        let mut next = NextBeam::default();
        for &class in &candidates {
            let p = f64::from(row[class as usize]);
            for prefix in &current {
                if class == blank {
                    let e = next.entry(prefix.node);
                    e.ends_blank = log_add(e.ends_blank, prefix.score() + p);
                    continue;
                }
                let extended = tree.child(prefix.node, class);
                if tree.last(prefix.node) == Some(class) {
                    // A repeat only starts a new label after a blank; otherwise it merges.
                    let e = next.entry(prefix.node);
                    e.ends_label = log_add(e.ends_label, prefix.ends_label + p);
                    let e = next.entry(extended);
                    e.ends_label = log_add(e.ends_label, prefix.ends_blank + p);
                } else {
                    let e = next.entry(extended);
                    e.ends_label = log_add(e.ends_label, prefix.score() + p);
                }
            }
        }
        let mut prefixes = next.prefixes;
        prefixes.sort_by(|a, b| b.score().total_cmp(&a.score()));
        // Prefixes no alignment reaches (probability zero) are dropped, keeping at least one.
        let reachable = prefixes.iter().filter(|p| p.score() > NEG_INF).count();
        prefixes.truncate(beam.min(reachable.max(1)));
        current = prefixes;
    }
    current
        .into_iter()
        .map(|p| (tree.labels(p.node), p.score() as f32))
        .collect()
}

/// Indices of the `k` largest entries of `row`, largest first (ties: lower index first).
fn top_classes(row: ArrayView1<f32>, k: usize, out: &mut Vec<u32>) {
    out.clear();
    out.extend(0..row.len() as u32);
    let by_value = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if k < out.len() {
        out.select_nth_unstable_by(k, by_value);
        out.truncate(k);
    }
    out.sort_by(by_value);
}
