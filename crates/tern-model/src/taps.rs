//! Taps: every projection's input and output in a forward pass, what layer-wise distillation
//! matches. They are an observer applied from outside the model, as tensor parallelism is
//! ([`tap`] wraps the hooks of the listed blocks' projections); the model code does not know them.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::hooks::Hooks;
use crate::model::Llama;

/// A projection's input and output in one forward pass.
#[derive(Debug, Clone)]
pub struct Tap<B: Backend> {
    /// The projection's path in its block, as [`crate::model::Block::projections`] names it
    /// (`self_attn.q_proj`, ..., `mlp.down_proj`).
    pub name: &'static str,
    pub input: Tensor<B, 3>,
    pub output: Tensor<B, 3>,
}

type Seen = (
    usize,
    &'static str,
    Box<dyn Any + Send>,
    Box<dyn Any + Send>,
);

#[derive(Default)]
struct Shared {
    seen: Mutex<Vec<Seen>>,
    /// Recording only while on: other passes of the same model (a validation loss) keep nothing.
    on: AtomicBool,
}

/// What the tapped projections of one model saw, in call order; shared by their hooks.
#[derive(Clone, Default)]
pub struct Recorder(Arc<Shared>);

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.seen.lock().map_or(0, |v| v.len());
        write!(f, "Recorder({n} taps)")
    }
}

impl Recorder {
    /// Starts (`true`) or stops recording; [`tap`] returns a recorder that records.
    pub fn record(&self, on: bool) {
        self.0.on.store(on, Ordering::SeqCst);
    }

    fn push(&self, seen: Seen) {
        if self.0.on.load(Ordering::SeqCst) {
            self.0
                .seen
                .lock()
                .expect("no panic while recording")
                .push(seen);
        }
    }

    /// The taps recorded since the last call, for each block of `layers` (in that order), each
    /// block's in call order (q, k, v, o, gate, up, down); blocks not run give none.
    pub fn take<B: Backend>(&self, layers: &[usize]) -> Vec<Vec<Tap<B>>> {
        let seen = std::mem::take(&mut *self.0.seen.lock().expect("no panic while recording"));
        let mut out: Vec<Vec<Tap<B>>> = layers.iter().map(|_| Vec::new()).collect();
        for (layer, name, input, output) in seen {
            let Some(k) = layers.iter().position(|&l| l == layer) else {
                continue;
            };
            let tensor = |b: Box<dyn Any + Send>| {
                *b.downcast::<Tensor<B, 3>>()
                    .expect("taps are the 3-d tensors of the model's backend")
            };
            out[k].push(Tap {
                name,
                input: tensor(input),
                output: tensor(output),
            });
        }
        out
    }
}

/// Hooks that also record the projection's input and output (when `point` is set), then do what
/// `inner` does.
#[derive(Clone, Debug)]
pub struct Tapped<H> {
    pub inner: H,
    point: Option<(usize, &'static str, Recorder)>,
}

/// `m` with the projections of blocks `layers` recording into the returned [`Recorder`].
pub fn tap<B: Backend, H: Clone>(
    m: Llama<B, H>,
    layers: &[usize],
) -> (Llama<B, Tapped<H>>, Recorder) {
    let recorder = Recorder::default();
    recorder.record(true);
    let tapped = m.map_hooks(|at, inner| {
        let point = at
            .filter(|(layer, _)| layers.contains(layer))
            .map(|(layer, name)| (layer, name, recorder.clone()));
        Tapped { inner, point }
    });
    (tapped, recorder)
}

impl<B: Backend, H: Hooks<B>> Hooks<B> for Tapped<H> {
    fn module_input<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.inner.module_input(x)
    }
    fn encoder_hidden<const D: usize>(&self, h: Tensor<B, D>) -> Tensor<B, D> {
        self.inner.encoder_hidden(h)
    }
    fn encoder_inner<const D: usize>(&self, h: Tensor<B, D>) -> Tensor<B, D> {
        self.inner.encoder_inner(h)
    }
    fn encoder_output<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.inner.encoder_output(x)
    }
    fn row_sum<const D: usize>(&self, s: Tensor<B, D>) -> Tensor<B, D> {
        self.inner.row_sum(s)
    }
    fn row_len(&self, local: usize) -> usize {
        self.inner.row_len(local)
    }
    fn row_max<const D: usize>(&self, m: Tensor<B, D>) -> Tensor<B, D> {
        self.inner.row_max(m)
    }
    fn on_whole_rows<const D: usize>(
        &self,
        x: Tensor<B, D>,
        f: impl FnOnce(Tensor<B, D>) -> Tensor<B, D>,
    ) -> Tensor<B, D> {
        self.inner.on_whole_rows(x, f)
    }
    fn output<const D: usize>(&self, y: Tensor<B, D>) -> Tensor<B, D> {
        self.inner.output(y)
    }
    fn observe<const D: usize>(&self, input: &Tensor<B, D>, output: &Tensor<B, D>) {
        if let Some((layer, name, rec)) = &self.point {
            rec.push((
                *layer,
                name,
                Box::new(input.clone()),
                Box::new(output.clone()),
            ));
        }
        self.inner.observe(input, output);
    }
    fn splits_input(&self) -> bool {
        self.inner.splits_input()
    }
    fn splits_output(&self) -> bool {
        self.inner.splits_output()
    }
    fn embed(&self, table: Tensor<B, 2>, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.inner.embed(table, tokens)
    }
    fn head_input(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.inner.head_input(x)
    }
    fn loss(&self, logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1>
    where
        B: tern_kernels::Kernels,
    {
        self.inner.loss(logits, targets)
    }
    fn whole_logits(&self, logits: Tensor<B, 3>) -> Tensor<B, 3> {
        self.inner.whole_logits(logits)
    }
}
