// tests/reference/torch_ref.hpp — LibTorch as an oracle, behind a plain-array interface.
//
// Why a wall between tessera and LibTorch: a translation unit that includes <torch/torch.h>
// takes about 27 s to compile, and LibTorch's headers bring their own idea of C++ dialect,
// macros and `Tensor`. So exactly one file (torch_ref.cpp) includes torch; it is compiled once
// into the static library `tessera_torch_ref`, and the cross-check tests talk to it through
// this header, which knows neither torch types nor tessera types: only flat float arrays with
// a shape. The tests convert tessera tensors to and from `Array`.
//
// Every function runs the op in LibTorch with autograd: the inputs are leaves with
// requires_grad, the output is back-propagated with the given upstream gradient `dy`, and the
// forward result and every input gradient come back as float arrays.
//
// Precision:
//   kFloat32   everything in float32.
//   kBFloat16  the inputs (already bf16-representable) become bf16 leaf tensors; the op runs
//              in float32 on them (leaf.to(float)), its output is rounded to bf16 once, and
//              autograd rounds each leaf's gradient to bf16 once. That is tessera's contract
//              for low precision ("widen, compute in float, round once"), so the comparison
//              can be as tight as one bf16 ulp.
// Why not LibTorch's own bf16 kernels: in LibTorch 1.13 on the CPU they are not a sharper
// reference than that contract, nor a consistent one. native_bf16_survey() below measures
// them (docs/testing.md has the table): 2-D matmul, linear, softmax, exact gelu and sums do
// compute in float and round once (0-0.02% of elements differ from float-then-round), but
// small batched matmuls (below MKL-DNN's size threshold) and embedding_backward accumulate in
// bf16 (64% / 33% of elements differ, by up to 2 / 4 ulps), silu, tanh-gelu, log_softmax,
// layer_norm and softmax's backward differ by 1-6 ulps in 14-76% of the elements (they round
// intermediate results to bf16), and a scalar operand (x * alpha) is rounded to bf16 before
// the product. A reference that accumulates in bf16 would hide exactly the bug the bf16
// checks look for (an accumulator left in bf16), and one whose error depends on the op would
// need a tolerance per op that says more about LibTorch than about tessera.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace torch_ref {

// A dense row-major array of float values (bf16 values are stored widened to float).
struct Array {
  std::vector<float> data;
  std::vector<int64_t> shape;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

// Integer ids (class targets, token ids, top-k indices).
struct IndexArray {
  std::vector<int64_t> data;
  std::vector<int64_t> shape;
};

enum class Precision { kFloat32, kBFloat16 };

// Sets LibTorch's intra-op thread count (the tests use 2: the CI machine has two cores).
void set_num_threads(int n);
// "LibTorch 1.13.0, N threads", for the test log.
std::string describe();

// What LibTorch's own bf16 CPU kernels do, measured against "compute in float on the same
// bf16 inputs, round once" (the reference kBFloat16 uses): per op, the fraction of elements
// that differ and the largest difference, in ulps of the tensor's largest element (small
// elements that cancelled would make a per-element ulp count meaningless). Fixed inputs
// (torch::manual_seed(0)); docs/testing.md quotes the table. Run with
//   test_torch_elementwise --run_test=native_bf16_survey --log_level=message
struct SurveyRow {
  std::string op;
  double fraction_differing;
  double max_ulps;       // max |native - ideal| / ulp(max |ideal|)
  double max_elem_ulps;  // max |native - ideal| / ulp(ideal), over |ideal| >= max |ideal| / 8
};
std::vector<SurveyRow> native_bf16_survey();

// ---- number conversion -------------------------------------------------------------------

enum class Format { kFloat32, kBFloat16, kFloat16 };
struct CastResult {
  Array y;   // x converted by LibTorch's x.to(dtype) (round to nearest even), widened to float
  Array dx;  // dy (given in `to`'s format) converted back to `from`'s format by autograd
};
// x holds values of format `from` (widened to float). The float arrays carry every bf16/fp16
// value exactly, NaN and infinities included, so the caller can compare bit patterns.
CastResult cast(const Array& x, Format from, Format to, const Array& dy);

// ---- matrix products -----------------------------------------------------------------------

struct MatmulResult {
  Array y, da, db;
};
// y = op(a) @ op(b) with op(m) = m^T (last two axes) when trans_* is set; leading (batch) axes
// broadcast as torch.matmul does. dy has y's shape.
MatmulResult matmul(const Array& a, const Array& b, bool trans_a, bool trans_b, const Array& dy,
                    Precision p);

struct LinearResult {
  Array y, dx, dw, db;  // db is empty (numel 0, shape {}) when there is no bias
};
// y = x @ w^T + bias, w (out, in) as torch.nn.functional.linear.
LinearResult linear(const Array& x, const Array& w, const std::optional<Array>& bias,
                    const Array& dy, Precision p);

// ---- element-wise ----------------------------------------------------------------------------

struct BinaryResult {
  Array y, da, db;  // da, db have a's and b's shapes (broadcast axes summed by autograd)
};
// a + b with torch's broadcasting (x (..., n) + bias (n) is tessera's add_bias).
BinaryResult add(const Array& a, const Array& b, const Array& dy, Precision p);
BinaryResult mul(const Array& a, const Array& b, const Array& dy, Precision p);

struct UnaryResult {
  Array y, dx;
};
// y = alpha * x
UnaryResult scale(const Array& x, double alpha, const Array& dy, Precision p);
// y = a + alpha * b (torch.add(a, b, alpha=alpha))
BinaryResult add_scaled(const Array& a, const Array& b, double alpha, const Array& dy, Precision p);

// ---- selection ---------------------------------------------------------------------------------

struct TopkResult {
  Array values;
  IndexArray indices;
  Array dx;  // dy scattered back to the selected positions
};
// torch.topk(x, k, dim=-1, largest, sorted=true)
TopkResult topk(const Array& x, int64_t k, bool largest, const Array& dy, Precision p);

// ---- softmax family --------------------------------------------------------------------------

// Softmax / log-softmax over the last axis.
UnaryResult softmax(const Array& x, const Array& dy, Precision p);
UnaryResult log_softmax(const Array& x, const Array& dy, Precision p);

// The backward kernels alone, applied to a given forward output y (LibTorch's
// _softmax_backward_data / _log_softmax_backward_data, in float, rounded once): checks a
// backward on exactly the saved state it is given, which for bf16 is the rounded y.
Array softmax_backward(const Array& y, const Array& dy, Precision p);
Array log_softmax_backward(const Array& y, const Array& dy, Precision p);

enum class Reduction { kNone, kMean, kSum };
struct CrossEntropyResult {
  Array loss;     // shape {} for mean/sum, {N} for none
  Array dlogits;  // (N, C)
};
// torch.nn.functional.cross_entropy(logits (..., C) flattened to (N, C), targets (...)
// flattened to (N), ignore_index, reduction, label_smoothing), back-propagated with dloss
// (loss's shape: {} for mean/sum, targets' shape for none).
CrossEntropyResult cross_entropy(const Array& logits, const IndexArray& targets,
                                 int64_t ignore_index, double label_smoothing, Reduction reduction,
                                 const Array& dloss, Precision p);

// ---- normalisation -----------------------------------------------------------------------------

struct NormResult {
  Array y, dx, dweight, dbias;  // dbias empty for rmsnorm / no bias
  Array mean, rstd;             // per-row statistics (rows); mean empty for rmsnorm
};
// y = x / sqrt(mean(x^2, last axis) + eps) * weight   (composite: LibTorch 1.13 has no rms_norm)
NormResult rmsnorm(const Array& x, const Array& weight, double eps, const Array& dy, Precision p);
// torch.nn.functional.layer_norm over the last axis, with weight and (optional) bias.
NormResult layernorm(const Array& x, const Array& weight, const std::optional<Array>& bias,
                     double eps, const Array& dy, Precision p);

// ---- activations -------------------------------------------------------------------------------

UnaryResult silu(const Array& x, const Array& dy, Precision p);
// approximate: "none" (erf) or "tanh", as torch.nn.functional.gelu
UnaryResult gelu(const Array& x, const std::string& approximate, const Array& dy, Precision p);
struct SwiGluResult {
  Array y, dgate, dup;
};
// silu(gate) * up (composite)
SwiGluResult swiglu(const Array& gate, const Array& up, const Array& dy, Precision p);

// ---- rotary position embedding -----------------------------------------------------------------

enum class RopeLayout {
  kHalfSplit,    // pairs (i, i + d/2): GPT-NeoX / Llama "rotate_half"
  kInterleaved,  // pairs (2i, 2i + 1): GPT-J / the original RoFormer
};
enum class RopeScaling { kNone, kLinear, kNtk, kYarn };
struct RopeSpec {
  int64_t rotary_dim = 0;  // leading features of each head that rotate (0: the whole head)
  double base = 10000.0;
  RopeLayout layout = RopeLayout::kHalfSplit;
  RopeScaling scaling = RopeScaling::kNone;
  double factor = 1.0;
  int64_t original_max_positions = 4096;  // YaRN: the trained context length
  double beta_fast = 32.0;                // YaRN ramp ends, in rotations over that context
  double beta_slow = 1.0;
  // YaRN cos/sin factor: attention_factor when > 0, else
  // get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) (denominator 1 when
  // mscale_all_dim is 0), get_mscale(s, m) = 0.1 m ln(s) + 1 for s > 1, else 1.
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
  double attention_factor = 0.0;
};
// Inverse frequencies (rotary_dim / 2 of them) and the cos/sin scale, computed with torch ops
// from the published formulas (see torch_ref.cpp); exposed so a test can compare frequency
// tables too.
struct RopeTables {
  Array inv_freq;  // (rotary_dim / 2)
  double attention_scale = 1.0;
};
RopeTables rope_tables(const RopeSpec& spec);
// x (B, T, H, D) or (T, H, D); positions (T) or (B, T). Rotates the first rotary_dim features
// of every head; the rest pass through.
UnaryResult rope(const Array& x, const IndexArray& positions, const RopeSpec& spec, const Array& dy,
                 Precision p);

// ---- attention
// -----------------------------------------------------------------------------------

// Which keys each query may read: allowed[(b * T + i) * T + j] != 0 when query i of sequence b
// reads key j. Shape (B, T, T). Built by the caller from the window rule it is testing.
struct Mask {
  std::vector<uint8_t> allowed;
  std::vector<int64_t> shape;
};

// A learned window gate (tessera's LearnedSelector), written from its documented definition:
// per query block qb of `block` tokens, m = mean of x over the signal rows
// [max(0, qb * block - block + 1), qb * block] (the block-length span ending at the block's first
// token), logits = weight m + bias, p = softmax(logits); the block's attention output (before wo)
// is multiplied by the straight-through factor p_c / stopgrad(p_c) (= 1), c = `choice`; the
// compute penalty penalty * mean over blocks of (cost_c + E - stopgrad(E)), E = sum_s p_s cost_s,
// is added to the loss. The gate runs in double (as tessera's does), so its argmax is comparable.
struct AttentionGate {
  Array weight;              // (n_sizes, C)
  Array bias;                // (n_sizes)
  IndexArray choice;         // (B, blocks) the size index each query block ran with
  int64_t block = 0;         // tokens per query block
  std::vector<double> cost;  // (n_sizes) each size's penalty cost
  double penalty = 0.0;
};

struct AttentionResult {
  Array y, dx, dwq, dwk, dwv, dwo;
  Array dgate_weight, dgate_bias;  // empty without a gate
  IndexArray gate_argmax;          // (B, blocks) argmax of LibTorch's gate logits (first wins)
  double aux_loss = 0.0;           // the gate's penalty (0 without a gate)
};

// Grouped-query attention as plain tensor algebra: q = rope(x wq^T), k = rope(x wk^T),
// v = x wv^T (heads of head_dim = wq.rows / heads; query head h reads kv head h / (heads /
// kv_heads) via repeat_interleave), scores q k^T / sqrt(head_dim), -inf where `mask` is 0,
// softmax over keys, o = P v, y = o wo^T. RoPE at positions 0..T-1 from `rope` (as rope()).
// x, dy (B, T, C); wq (H*hd, C); wk, wv (KV*hd, C); wo (C, H*hd). The loss is <y, dy> (+ the
// gate's penalty). For kBFloat16 the result is rounded to bf16 where tessera stores a tensor
// (after each projection, after RoPE, the attention output o, y), which autograd mirrors on the
// way back (the gradients at those points are rounded too).
AttentionResult attention(const Array& x, const Array& wq, const Array& wk, const Array& wv,
                          const Array& wo, int64_t heads, int64_t kv_heads, const RopeSpec& rope,
                          const Mask& mask, const std::optional<AttentionGate>& gate,
                          const Array& dy, Precision p);

// ---- mixture of experts ------------------------------------------------------------------------

enum class RouterScore { kSoftmax, kSigmoid };

// The routing rule, spelled out (tessera's router policies, from docs/moe.md).
struct MoESpec {
  RouterScore score = RouterScore::kSoftmax;
  bool renormalize = false;  // weights = s / sum of the chosen s
  int64_t top_k = 1;
  int64_t groups = 1;      // group-limited: experts split into `groups` consecutive groups;
  int64_t top_groups = 1;  // a group scores the sum of its two best selection scores
  std::optional<Array> selection_bias;  // (experts) added to s for the choice only
  double aux_alpha = 0.0;               // > 0: L = alpha N sum_i f_i P_i is added to the loss
  double aux_grad = 1.0;                // dLoss/dL
  int64_t capacity = -1;                // rows per expert, first come in token order; -1: unlimited
};

// One SwiGLU FFN: w_down (silu(w_gate x) * (w_up x)).
struct FfnWeights {
  Array w_gate, w_up, w_down;  // (hidden, d), (hidden, d), (d, hidden)
};
struct FfnGrads {
  Array dw_gate, dw_up, dw_down;
};

struct MoEResult {
  Array y, dx, dgate;
  std::vector<FfnGrads> experts, shared;
  IndexArray chosen;  // (tokens, k) experts by descending selection score, ties to the lower index
  Array weights;      // (tokens, k)
  IndexArray kept;    // (tokens, k) 1 when the assignment ran, 0 when capacity dropped it
  Array selection;    // (tokens, experts) the selection scores (-inf outside the kept groups)
  double aux_loss = 0.0;
};

// Mixture of experts as a loop over experts: logits = x gate^T, s = softmax / sigmoid, top-k of
// s (+ bias) inside the top groups, weights (renormalised or not), then for each expert the
// kept tokens routed to it go through its FFN and are added back times their weight; every
// shared expert is added for every token. x, dy (tokens, d); gate (experts, d). Loss
// <y, dy> + aux_grad * L_aux. For kBFloat16, rounded where tessera stores a tensor (the
// logits, each FFN's gate / up / activation / output, y).
MoEResult moe(const Array& x, const Array& gate, const std::vector<FfnWeights>& experts,
              const std::vector<FfnWeights>& shared, const MoESpec& spec, const Array& dy,
              Precision p);

// ---- a whole decoder ---------------------------------------------------------------------------

struct NamedArray {
  std::string name;
  Array array;
};

// One block of the decoder: its attention mask (B, T, T) and, for an MoE block, the routing rule
// and the expert counts (a dense block has `moe` empty).
struct DecoderLayerSpec {
  Mask mask;
  std::optional<MoESpec> moe;
  int64_t experts = 0, shared = 0;
};
struct DecoderSpec {
  int64_t vocab = 0, d_model = 0, heads = 0, kv_heads = 0;
  double norm_eps = 1e-6;
  RopeSpec rope;
  bool tie_embeddings = false;
  int64_t ignore_index = -100;
  std::vector<DecoderLayerSpec> layers;
};
struct DecoderResult {
  double loss = 0.0, cross_entropy = 0.0, aux_loss = 0.0;
  Array logits;                    // (B, T, vocab)
  std::vector<NamedArray> grads;   // d loss / d weight, in the order the weights were given
  std::vector<IndexArray> chosen;  // per layer: the MoE's chosen experts (empty when dense)
};

// A pre-norm decoder from its weights, found by the names of docs/models.md ("embed.weight",
// "layers.<l>.norm1.weight", "layers.<l>.attn.wq" ... "layers.<l>.ffn.experts.<e>.w_gate" ...,
// "norm.weight", "lm_head.weight" unless tied): embedding; per layer h += wo attn(rmsnorm(h))
// (attention() with the layer's mask, RoPE from spec.rope) and h += ffn(rmsnorm(h)) (a SwiGLU,
// or moe() with the layer's rule); the final RMSNorm, the LM head, the mean cross-entropy over
// targets != ignore_index, plus every MoE layer's aux loss. loss.backward() by autograd gives
// the gradient of every weight. Float32 only. Throws if a weight is missing or one is left over.
DecoderResult decoder(const std::vector<NamedArray>& weights, const IndexArray& tokens,
                      const IndexArray& targets, const DecoderSpec& spec);

// ---- embedding
// -----------------------------------------------------------------------------------

struct EmbeddingResult {
  Array y, dweight;
};
// torch.nn.functional.embedding(ids, weight (V, D)); dweight by autograd's scatter-add.
EmbeddingResult embedding(const Array& weight, const IndexArray& ids, const Array& dy, Precision p);

}  // namespace torch_ref
