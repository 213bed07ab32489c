// tessera_demo — the README's main program: a tour of the foundation, ending in a model
// that learns from real text.
//
// What you will see:
//   1. tensors, views and number formats (how much of pi each format keeps);
//   2. a tiny next-byte language model written with nothing but tessera's ops and their
//      explicit backward passes: embedding -> RMSNorm -> linear -> SwiGLU -> linear ->
//      cross-entropy. No autograd tape: every gradient below is one `*_backward` call;
//   3. it trains on real text — Tang poems and Song lyrics from Debian's fortunes-zh when
//      installed, otherwise a built-in English passage — and compares its validation
//      perplexity with the unigram perplexity of the same bytes, so you can see it learned.
// Later issues turn this program into the flagship trainer of a full R1 model.
//
// Usage: tessera_demo [--steps N] [--seed S]
#include <tessera/tessera.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace ts = tessera;
namespace ops = tessera::ops;

namespace {

struct Options {
  int steps = 300;
  std::uint64_t seed = 42;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--steps" && i + 1 < argc) {
      o.steps = std::atoi(argv[++i]);
    } else if (a == "--seed" && i + 1 < argc) {
      o.seed = std::strtoull(argv[++i], nullptr, 10);
    } else {
      std::fprintf(stderr, "usage: %s [--steps N] [--seed S]\n", argv[0]);
      std::exit(2);
    }
  }
  if (o.steps < 1) {
    std::fprintf(stderr, "--steps must be at least 1\n");
    std::exit(2);
  }
  return o;
}

// Fortune files hold records separated by lines containing only "%"; the separators are
// markup, not text, so they are dropped.
std::string read_fortunes(const char* path) {
  std::ifstream in(path);
  std::string text, line;
  while (std::getline(in, line))
    if (line != "%") text += line + '\n';
  return text;
}

std::string load_corpus(std::string& source) {
  std::string text;
  for (const char* p : {"/usr/share/games/fortunes/tang300", "/usr/share/games/fortunes/song100"})
    text += read_fortunes(p);
  if (text.size() > 10000) {
    source = "Tang poems + Song lyrics (Debian fortunes-zh)";
    return text;
  }
  source = "built-in English passage (install fortunes-zh for real Chinese text)";
  const std::string passage =
      "In the beginning God created the heaven and the earth. And the earth was without form, "
      "and void; and darkness was upon the face of the deep. And the Spirit of God moved upon "
      "the face of the waters. And God said, Let there be light: and there was light. And God "
      "saw the light, that it was good: and God divided the light from the darkness.\n";
  for (int i = 0; i < 40; ++i) text += passage;
  return text;
}

// Weights drawn from tessera's counter-based RNG: the same seed gives the same model on any
// machine and thread count. Each tensor uses its own subsequence of the stream.
ts::Tensor<float> normal(ts::Shape shape, float stddev, ts::Seed seed, std::uint64_t sub) {
  auto t = ts::Tensor<float>::empty(shape);
  ts::fill_normal(t.data(), t.numel(), seed, sub, 0.0f, stddev);
  return t;
}

// SGD with momentum: v = mu v + g; w -= lr v. Written with tessera's elementwise ops.
struct Sgd {
  float lr, momentum;
  void step(ts::Tensor<float>& w, ts::Tensor<float>& velocity, const ts::Tensor<float>& grad) const {
    velocity = ops::add_scaled<float>(grad, velocity, momentum);  // g + mu v
    w = ops::add_scaled<float>(w, velocity, -lr);
  }
};

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  std::printf("%s — CPU features: %s\n\n", ts::version_string(), ts::cpu_features_summary().c_str());

  // 1. A glance at the core --------------------------------------------------------------
  std::puts("1. Tensors and number formats");
  auto x = ts::Tensor<float>::from({2, 3}, {1, 2, 3, 4, 5, 6});
  std::printf("   x = %s, x.transpose(0, 1)(2, 1) = %g (a view: no copy)\n",
              (std::ostringstream() << x).str().c_str(), x.transpose(0, 1)(2, 1));
  const float pi = 3.14159265f;
  std::printf("   pi as bf16 %.7g, fp16 %.7g, fp8_e4m3 %.7g, fp8_e5m2 %.7g\n\n",
              static_cast<float>(ts::bf16(pi)), static_cast<float>(ts::fp16(pi)),
              static_cast<float>(ts::fp8_e4m3(pi)), static_cast<float>(ts::fp8_e5m2(pi)));

  // 2. Data: bytes of real text, split 90/10 into training and validation ----------------
  std::string source;
  const std::string text = load_corpus(source);
  const auto split = static_cast<std::int64_t>(text.size() * 9 / 10);
  std::printf("2. Data: %s, %zu bytes (%lld for training, %zu for validation)\n", source.c_str(),
              text.size(), static_cast<long long>(split), text.size() - split);
  // The unigram perplexity (byte frequencies of the training part, evaluated on validation)
  // is the bar to clear: a model that ignores context cannot beat it.
  std::vector<double> counts(256, 1.0);  // add-one smoothing so no byte has probability 0
  for (std::int64_t i = 0; i < split; ++i) counts[static_cast<unsigned char>(text[i])] += 1;
  double unigram_nll = 0;
  for (std::size_t i = split; i < text.size(); ++i)
    unigram_nll -= std::log(counts[static_cast<unsigned char>(text[i])] / (split + 256.0));
  const double unigram_ppl = std::exp(unigram_nll / (text.size() - split));
  std::printf("   unigram perplexity of the validation bytes: %.2f\n\n", unigram_ppl);

  // 3. The model: predicts byte t+1 from byte t --------------------------------------------
  constexpr std::int64_t kVocab = 256, kDim = 64, kHidden = 128, kBatch = 512;
  const ts::Seed seed{opt.seed};
  auto table = normal({kVocab, kDim}, 1.0f, seed, 0);               // (vocab, dim)
  auto gain = ts::Tensor<float>::full({kDim}, 1.0f);                 // RMSNorm weight (dim)
  auto w_in = normal({2 * kHidden, kDim}, 1.0f / std::sqrt(float(kDim)), seed, 1);  // (2h, dim)
  auto w_out = normal({kVocab, kHidden}, 1.0f / std::sqrt(float(kHidden)), seed, 2);  // (vocab, h)
  ts::Tensor<float> v_table(table.shape()), v_gain(gain.shape()), v_in(w_in.shape()),
      v_out(w_out.shape());
  const Sgd sgd{0.5f, 0.9f};
  std::printf("3. Model: embedding(%lld, %lld) -> RMSNorm -> linear(%lld) -> SwiGLU -> linear(%lld)\n",
              (long long)kVocab, (long long)kDim, (long long)(2 * kHidden), (long long)kVocab);

  // Forward for a batch of positions; returns the mean loss and, when `learn`, applies one
  // SGD step using the explicit backward of every op, in reverse order.
  auto run_batch = [&](const std::vector<std::int32_t>& in_ids, const std::vector<std::int32_t>& out_ids,
                       bool learn) {
    const auto n = static_cast<std::int64_t>(in_ids.size());
    auto ids = ts::Tensor<std::int32_t>::from({n}, in_ids);
    auto targets = ts::Tensor<std::int32_t>::from({n}, out_ids);
    auto h = ops::embedding<float>(table, ids);                       // (n, dim)
    auto norm = ops::rms_norm<float>(h, gain, 1e-6);                  // (n, dim)
    auto gate_up = ops::linear<float>(norm.y, w_in);                  // (n, 2h)
    auto act = ops::swiglu_fused<float>(gate_up);                     // (n, h)
    auto logits = ops::linear<float>(act, w_out);                     // (n, vocab)
    auto ce = ops::cross_entropy<float>(logits, targets);             // scalar mean loss
    const float loss = ce.loss.data()[0];
    if (!learn) return loss;

    auto one = ts::Tensor<float>::full(ts::Shape{}, 1.0f);
    auto dlogits = ops::cross_entropy_backward<float>(one, logits, targets, ce.logsumexp);
    auto g_out = ops::linear_backward<float>(dlogits, act, w_out, /*with_bias=*/false);
    auto dgate_up = ops::swiglu_fused_backward<float>(g_out.dx, gate_up);
    auto g_in = ops::linear_backward<float>(dgate_up, norm.y, w_in, false);
    auto g_norm = ops::rms_norm_backward<float>(g_in.dx, h, gain, norm.rstd);
    auto dtable = ops::embedding_backward<float>(g_norm.dx, ids, kVocab);
    sgd.step(w_out, v_out, g_out.dweight);
    sgd.step(w_in, v_in, g_in.dweight);
    sgd.step(gain, v_gain, g_norm.dweight);
    sgd.step(table, v_table, dtable);
    return loss;
  };

  auto batch_at = [&](std::int64_t begin, std::int64_t count, std::vector<std::int32_t>& in,
                      std::vector<std::int32_t>& out) {
    in.resize(count);
    out.resize(count);
    for (std::int64_t i = 0; i < count; ++i) {
      in[i] = static_cast<unsigned char>(text[begin + i]);
      out[i] = static_cast<unsigned char>(text[begin + i + 1]);
    }
  };
  auto validation_perplexity = [&] {
    std::vector<std::int32_t> in, out;
    double nll = 0;
    std::int64_t n = 0;
    for (std::int64_t b = split; b + 1 < static_cast<std::int64_t>(text.size()); b += 4096) {
      const std::int64_t count = std::min<std::int64_t>(4096, text.size() - 1 - b);
      batch_at(b, count, in, out);
      nll += run_batch(in, out, false) * count;
      n += count;
    }
    return std::exp(nll / n);
  };

  std::printf("   validation perplexity before training: %.2f\n", validation_perplexity());
  ts::Philox order(seed, 3);  // picks training windows; reproducible from the seed
  std::vector<std::int32_t> in, out;
  const auto start = std::chrono::steady_clock::now();
  for (int step = 1; step <= opt.steps; ++step) {
    const std::int64_t begin = order.next_u32() % static_cast<std::uint32_t>(split - kBatch - 1);
    batch_at(begin, kBatch, in, out);
    const float loss = run_batch(in, out, true);
    if (step == 1 || step % 50 == 0 || step == opt.steps)
      std::printf("   step %4d  train loss %.4f\n", step, loss);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double ppl = validation_perplexity();
  std::printf("   %d steps in %.2f s (%.0f tokens/s)\n", opt.steps, seconds,
              opt.steps * kBatch / seconds);
  std::printf("\nValidation perplexity: %.2f (unigram: %.2f) — %s\n", ppl, unigram_ppl,
              ppl < unigram_ppl ? "the model learned to use context" : "no better than unigram");
  return ppl < unigram_ppl ? 0 : 1;
}
