// 04 — A tiny R1 decoder: a model is a config type
//
// What you will learn:
//   * a model is described by a config struct of numbers and policy types; `ts::Decoder<Config>`
//     builds the whole stack from it (embedding, blocks with a variable attention window and a
//     mixture of experts, final norm, LM head), and a variant is one line of inheritance;
//   * one forward gives the next-token loss over a batch of (B, T) token ids, and one backward
//     fills every parameter's gradient; the loss of a fresh model is about ln(vocab), because
//     it starts out guessing uniformly;
//   * what the model reports: parameter counts, the fraction of parameters a token actually
//     uses (a mixture of experts runs only k of its N experts), and the fraction of full causal
//     attention work the variable window did;
//   * plain SGD on the gradients lowers the loss, and the weights go to a safetensors file and
//     come back bit for bit.
// The text is real: the first Tang poems of the fortunes-zh package if it is installed (UTF-8
// bytes of Chinese), else an English paragraph; tokens are bytes (vocab 256). The program checks
// what it prints and exits non-zero if something is wrong.
#include <tessera/tessera.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

namespace ts = tessera;
namespace nn = tessera::nn;

// ---- the model, as a type ------------------------------------------------------------------
struct TinyR1 {
  static constexpr int vocab = 256, d_model = 64, layers = 2;  // byte-level tokens
  static constexpr int heads = 4, kv_heads = 2;                // 2 query heads per kv head
  static constexpr int max_seq = 256, dense_layers = 1;        // block 0 dense, block 1 MoE
  // Query blocks of 16 tokens each pick a window of 16, 64 or all earlier tokens; a small gate
  // learns which, paying a compute penalty for long windows.
  using Window = ts::VariableWindow<ts::Sizes<16, 64, ts::kFull>, ts::LearnedSelector, 16>;
  // 8 experts in 4 groups; each token goes to its best 2 groups, then its top 2 experts there,
  // plus one shared expert every token uses. The aux loss keeps the experts evenly loaded.
  using Ffn = ts::MoE<ts::Experts<8>, ts::TopK<2>, ts::GroupLimited<4, 2>, ts::AuxLossBalance,
                      ts::SharedExperts<1>>;
};
static_assert(ts::DecoderConfig<TinyR1>);  // a broken rule would stop the build with a message

// The ablation partner: the same model with a plain sliding window. (Not run here; it shows
// that a variant is one line and checked the same way.)
struct TinyR1Sliding : TinyR1 { using Window = ts::SlidingWindow<64>; };
static_assert(ts::DecoderConfig<TinyR1Sliding>);

using Model = ts::Decoder<TinyR1>;

namespace {

int failures = 0;
void check(bool ok, const char* what) {
  if (!ok) {
    std::printf("CHECK FAILED: %s\n", what);
    ++failures;
  }
}

// Poem lines without the colour codes and separators of the fortunes file, or an English
// paragraph when the file is not there.
std::string load_text() {
  std::ifstream in("/usr/share/games/fortunes/tang300");
  std::string text, line;
  while (in && std::getline(in, line) && text.size() < 4000)
    if (!line.empty() && line[0] != '%' && line.find('\x1b') == std::string::npos) text += line + "\n";
  if (text.size() >= 1000) return text;
  return "It was the best of times, it was the worst of times, it was the age of wisdom, it was "
         "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it "
         "was the season of Light, it was the season of Darkness, it was the spring of hope, it "
         "was the winter of despair, we had everything before us, we had nothing before us, we "
         "were all going direct to Heaven, we were all going direct the other way. There were a "
         "king with a large jaw and a queen with a plain face, on the throne of England; there "
         "were a king with a large jaw and a queen with a fair face, on the throne of France.";
}

// One SGD step: w -= lr * grad for every parameter.
void sgd(Model& model, float lr) {
  model.visit_parameters([&](std::string_view, nn::Parameter<float>& p) {
    for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data()[i] -= lr * p.grad.data()[i];
  });
}

}  // namespace

int main() {
  // ---- a batch of real text: B = 4 windows of T + 1 = 129 bytes -----------------------------
  const std::string text = load_text();
  constexpr int64_t B = 4, T = 128;
  auto sequence = ts::Tensor<int32_t>::empty({B, T + 1});  // (B, T + 1)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t <= T; ++t)
      sequence(b, t) = static_cast<unsigned char>(text[(b * 211 + t) % text.size()]);
  // Inputs are the first T bytes, targets the T bytes that follow each input.
  const ts::models::NextTokenBatch batch = ts::models::next_token_batch(sequence);
  std::printf("text: %zu bytes; batch of %lld sequences x %lld tokens\n", text.size(),
              (long long)B, (long long)T);

  // ---- build the model -------------------------------------------------------------------------
  Model model{ts::Seed{42}};  // same seed, same weights, on any machine
  int64_t embed = 0, attention = 0, dense_ffn = 0, moe = 0, head = 0, norms = 0;
  model.visit_parameters([&](std::string_view name, nn::Parameter<float>& p) {
    const int64_t n = p.value.numel();
    if (name.starts_with("embed.")) embed += n;
    else if (name.starts_with("lm_head.")) head += n;
    else if (name.find(".attn.") != std::string_view::npos) attention += n;
    else if (name.starts_with("layers.0.ffn.")) dense_ffn += n;
    else if (name.find(".ffn.") != std::string_view::npos) moe += n;
    else norms += n;
  });
  std::printf("\nparameters: %lld in all\n", (long long)model.parameter_count());
  std::printf("  embedding %lld, attention %lld, dense FFN %lld, MoE FFN %lld, LM head %lld, "
              "norms %lld\n",
              (long long)embed, (long long)attention, (long long)dense_ffn, (long long)moe,
              (long long)head, (long long)norms);
  check(embed + attention + dense_ffn + moe + head + norms == model.parameter_count(),
        "the parts add up to the parameter count");

  // ---- one forward and one backward ------------------------------------------------------------
  Model::Saved saved;  // what backward needs; owned by the caller
  const ts::models::ModelStats st = model.forward(batch.tokens, batch.targets, saved);
  const double ln_vocab = std::log(double(TinyR1::vocab));
  std::printf("\nfresh model: cross-entropy %.4f (ln(vocab) = %.4f), aux loss %.5f, loss %.4f\n",
              st.cross_entropy, ln_vocab, st.aux_loss, st.loss);
  check(std::fabs(st.cross_entropy - ln_vocab) < 0.1, "a fresh model guesses nearly uniformly");
  check(st.loss == st.cross_entropy + st.aux_loss, "loss = cross-entropy + aux losses");

  // A token uses the embedding, attention, dense FFN, head, the gate, the shared expert and the
  // 2 routed experts it was sent to: not the other 6.
  std::printf("active parameters per token: %.1f%% (the MoE block runs %.0f%% of its experts)\n",
              100 * st.active_parameter_fraction, 100 * st.layers[1].moe_active_fraction);
  check(st.active_parameter_fraction < 1.0 && st.active_parameter_fraction > 0.5,
        "an MoE model uses part of its parameters per token");
  for (size_t l = 0; l < st.layers.size(); ++l) {
    const auto& ls = st.layers[l];
    std::printf("layer %zu: attention work %.2f of full causal; query blocks per window "
                "{16, 64, full}: [%lld %lld %lld]; window penalty %.5f%s\n",
                l, ls.attention_work_fraction, (long long)ls.window_histogram[0],
                (long long)ls.window_histogram[1], (long long)ls.window_histogram[2],
                ls.window_penalty, ls.moe ? "; MoE" : "; dense");
    check(ls.attention_work_fraction > 0.0 && ls.attention_work_fraction <= 1.0,
          "the variable window does at most full causal work");
  }
  std::printf("all layers: %.2f of full causal attention work\n", st.attention_work_fraction);

  model.zero_grad();
  model.backward(saved);  // every parameter's grad = d loss / d parameter
  // The gradient points uphill: a small step against it must lower the loss.
  sgd(model, 1e-3f);
  const double after_small_step = model.forward(batch.tokens, batch.targets, saved).loss;
  std::printf("\na step of 1e-3 against the gradient: loss %.6f -> %.6f\n", st.loss, after_small_step);
  check(after_small_step < st.loss, "the gradient is a descent direction");

  // ---- a few SGD steps -------------------------------------------------------------------------
  double loss = after_small_step;
  for (int step = 1; step <= 12; ++step) {
    model.zero_grad();
    model.backward(saved);
    sgd(model, 0.5f);
    loss = model.forward(batch.tokens, batch.targets, saved).loss;
    if (step % 3 == 0) std::printf("SGD step %2d: loss %.4f\n", step, loss);
  }
  check(loss < st.loss - 1.0, "12 SGD steps on one batch lower the loss by more than 1 nat");

  // ---- save and load ---------------------------------------------------------------------------
  const std::filesystem::path file =
      std::filesystem::temp_directory_path() / "tessera_04_tiny_decoder.safetensors";
  ts::save(model, file);  // safetensors: names like "layers.1.ffn.experts.5.w_up"
  Model reloaded{ts::Seed{7}};  // other weights...
  ts::load(reloaded, file);     // ...replaced by the file's
  Model::Saved saved2;
  const double reloaded_loss = reloaded.forward(batch.tokens, batch.targets, saved2).loss;
  std::printf("\nsaved %s (%lld bytes); reloaded model's loss %.6f (trained %.6f)\n",
              file.string().c_str(), (long long)std::filesystem::file_size(file), reloaded_loss,
              loss);
  check(reloaded_loss == loss, "the reloaded model computes the same loss, bit for bit");
  std::filesystem::remove(file);

  std::printf("\n%s\n", failures == 0 ? "all checks passed" : "SOME CHECKS FAILED");
  return failures == 0 ? 0 : 1;
}
