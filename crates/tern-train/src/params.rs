//! A model's parameters as a flat list in module order: names, shapes, values and gradients.
//! Module order is deterministic (unlike parameter ids, which are random per process), so it is
//! the order of optimizer state, checkpoints and, later, communication buckets.

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    /// Dotted module path, e.g. `layers.0.self_attn.q_proj.weight`.
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Matrices take weight decay; norm weights do not, nor Mamba's `A_log` (as in Mamba).
    pub fn decays(&self) -> bool {
        self.shape.len() >= 2 && !self.name.ends_with(".a_log")
    }
}

#[derive(Default)]
struct Names {
    path: Vec<String>,
    out: Vec<ParamInfo>,
}

impl<B: Backend> ModuleVisitor<B> for Names {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        self.out.push(ParamInfo {
            name: self.path.join("."),
            // The lazy shape: a parameter not initialized yet stays so.
            shape: p.lazy_shape().dims::<D>().to_vec(),
        });
    }
}

/// Names and shapes of every float parameter, in module order.
pub fn param_infos<B: Backend, M: Module<B>>(m: &M) -> Vec<ParamInfo> {
    let mut v = Names::default();
    m.visit(&mut v);
    v.out
}

struct Values<B: Backend>(Vec<Tensor<B, 1>>);
impl<B: Backend> ModuleVisitor<B> for Values<B> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        let t = p.val();
        let n = t.shape().num_elements();
        self.0.push(t.reshape([n]));
    }
}

/// Every float parameter flattened, in module order.
pub fn flat_values<B: Backend, M: Module<B>>(m: &M) -> Vec<Tensor<B, 1>> {
    let mut v = Values(Vec::new());
    m.visit(&mut v);
    v.0
}

struct Grads<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    out: Vec<Tensor<B::InnerBackend, 1>>,
}
impl<B: AutodiffBackend> ModuleVisitor<B> for Grads<'_, B> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        let t = p.val();
        let n = t.shape().num_elements();
        let g = match t.grad(self.grads) {
            Some(g) => g.reshape([n]),
            // A parameter the loss does not reach gets a zero gradient.
            None => t.inner().zeros_like().reshape([n]),
        };
        self.out.push(g);
    }
}

/// Gradients of every float parameter flattened, in module order.
pub fn flat_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    m: &M,
    grads: &B::Gradients,
) -> Vec<Tensor<B::InnerBackend, 1>> {
    let mut v = Grads::<B> {
        grads,
        out: Vec::new(),
    };
    m.visit(&mut v);
    v.out
}

struct AddGrads<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    sums: std::slice::IterMut<'a, Option<Tensor<B::InnerBackend, 1>>>,
}
impl<B: AutodiffBackend> ModuleVisitor<B> for AddGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        let slot = self.sums.next().expect("one slot per parameter");
        let t = p.val();
        if let Some(g) = t.grad(self.grads) {
            let g = g.reshape([t.shape().num_elements()]);
            *slot = Some(match slot.take() {
                Some(s) => s + g,
                None => g,
            });
        }
    }
}

/// Adds the gradients that `grads` holds to `sums` (one slot per float parameter, module order);
/// parameters it does not reach are left as they are.
pub fn add_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    m: &M,
    grads: &B::Gradients,
    sums: &mut [Option<Tensor<B::InnerBackend, 1>>],
) {
    let mut v = AddGrads::<B> {
        grads,
        sums: sums.iter_mut(),
    };
    m.visit(&mut v);
}

struct Assign<T> {
    values: std::vec::IntoIter<Option<T>>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Assign<Tensor<B::InnerBackend, 1>> {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some(new) = self.values.next().expect("one value per parameter") else {
            return p;
        };
        // Replaced without reading the old value: a lazy parameter is never initialized.
        let (id, shape) = (p.id, p.lazy_shape());
        Param::initialized(
            id,
            Tensor::<B, D>::from_inner(new.reshape(shape)).require_grad(),
        )
    }
}

/// Replaces every float parameter of a trainable module by the matching flat value (module order).
pub fn assign_trainable<B: AutodiffBackend, M: AutodiffModule<B>>(
    m: M,
    values: Vec<Tensor<B::InnerBackend, 1>>,
) -> M {
    assign_some_trainable(m, values.into_iter().map(Some).collect())
}

/// [`assign_trainable`] where `None` leaves a parameter as it is.
pub fn assign_some_trainable<B: AutodiffBackend, M: AutodiffModule<B>>(
    m: M,
    values: Vec<Option<Tensor<B::InnerBackend, 1>>>,
) -> M {
    let n = values.len();
    let mut a = Assign {
        values: values.into_iter(),
    };
    let m = m.map(&mut a);
    assert!(a.values.next().is_none(), "{n} values for fewer parameters");
    m
}

struct AssignPlain<B: Backend> {
    values: std::vec::IntoIter<Tensor<B, 1>>,
}
impl<B: Backend> ModuleMapper<B> for AssignPlain<B> {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let new = self.values.next().expect("one value per parameter");
        // Replaced without reading a lazy parameter's value (a new one requires a gradient).
        let grad = !p.is_initialized() || p.val().is_require_grad();
        let (id, shape) = (p.id, p.lazy_shape());
        // detach: a reshaped tensor is not a leaf of the autodiff graph; a parameter must be.
        let t = new.reshape(shape).detach().set_require_grad(grad);
        Param::initialized(id, t)
    }
}

/// Replaces every float parameter of a module by the matching flat value (module order).
pub fn assign<B: Backend, M: Module<B>>(m: M, values: Vec<Tensor<B, 1>>) -> M {
    let mut a = AssignPlain {
        values: values.into_iter(),
    };
    m.map(&mut a)
}
