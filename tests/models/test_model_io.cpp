// tests/models/test_model_io.cpp — saving and loading a Decoder (float) through safetensors:
// a bit-exact round trip of every weight (parameters and the MoE selection bias), the file's
// names and metadata, and the refusals — a missing, an extra, a mis-shaped and a wrongly typed
// tensor, a tied/untied mismatch and a file of another model kind — each with a message that
// names the tensor, and each leaving the model untouched. Also: a few SGD steps on one batch
// lower the loss (a sanity check beside the gradient tests), and zero_grad.
#define BOOST_TEST_MODULE test_model_io
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>
#include <string>
#include <unistd.h>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/io/safetensors.hpp"
#include "tessera/models/decoder.hpp"

namespace ts = tessera;
namespace nn = tessera::nn;
namespace fs = std::filesystem;
using ts::Seed;
using ts::Tensor;

namespace {

struct Io {
  static constexpr int vocab = 40, d_model = 16, layers = 2, heads = 2, kv_heads = 1;
  static constexpr int max_seq = 64, dense_layers = 1;
  using Window = ts::VariableWindow<ts::Sizes<8, ts::kFull>, ts::LearnedSelector, 8>;
  using Ffn = ts::MoE<ts::Experts<4>, ts::TopK<2>, ts::TopKSigmoid, ts::BiasBalance,
                      ts::SharedExperts<1>>;
};
struct IoTied : Io {
  static constexpr bool tie_embeddings = true;
};

using Model = ts::Decoder<Io>;

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("tessera_model_io_" + std::to_string(::getpid()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const char* name) const { return (path / name).string(); }
};

// A batch the model can learn: a repeating pattern of period 9.
std::pair<Tensor<int32_t>, Tensor<int32_t>> batch() {
  auto seq = Tensor<int32_t>::empty({2, 25});
  for (int64_t i = 0; i < seq.numel(); ++i) seq.data()[i] = static_cast<int32_t>((i % 9) * 4 + 1);
  auto b = ts::models::next_token_batch(seq);
  return {std::move(b.tokens), std::move(b.targets)};
}

// Every weight (name -> bytes), parameters and buffers.
template <class M>
std::vector<std::pair<std::string, std::vector<char>>> snapshot(M& m) {
  std::vector<std::pair<std::string, std::vector<char>>> out;
  m.visit_weights([&](std::string_view name, auto& t) {
    const char* p = reinterpret_cast<const char*>(t.data());
    out.emplace_back(std::string(name), std::vector<char>(p, p + t.size_bytes()));
  });
  return out;
}

// One SGD step on the batch, then the bias balance update: weights no fresh model has.
void train_step(Model& m, float lr) {
  auto [tokens, targets] = batch();
  Model::Saved s;
  (void)m.forward(tokens, targets, s);
  m.zero_grad();
  m.backward(s);
  m.visit_parameters([&](std::string_view, nn::Parameter<float>& p) {
    for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data()[i] -= lr * p.grad.data()[i];
  });
  m.update_balance(s);
}

// The model's weights as writable entries (copies), to build altered files from.
struct Entries {
  std::vector<std::pair<std::string, Tensor<float>>> tensors;
  explicit Entries(Model& m) {
    m.visit_weights([&](std::string_view n, Tensor<float>& t) { tensors.emplace_back(std::string(n), t.clone()); });
  }
  std::vector<ts::io::TensorEntry> list(const std::string& skip = "") const {
    std::vector<ts::io::TensorEntry> e;
    for (const auto& [n, t] : tensors)
      if (n != skip) e.emplace_back(n, t);
    return e;
  }
};

auto message_has(std::vector<std::string> parts) {
  return [parts](const ts::Error& e) {
    const std::string m = e.what();
    bool ok = true;
    for (const auto& p : parts) ok = ok && m.find(p) != std::string::npos;
    if (!ok) std::printf("unexpected message: %s\n", m.c_str());
    return ok;
  };
}

}  // namespace

BOOST_AUTO_TEST_CASE(round_trip_is_bit_exact) {
  TempDir dir;
  Model a{Seed{1}};
  train_step(a, 0.05f);
  bool bias_moved = false;
  a.visit_buffers([&](std::string_view, auto& b) {
    for (int64_t i = 0; i < b.numel(); ++i) bias_moved = bias_moved || b.data()[i] != 0.0f;
  });
  BOOST_TEST(bias_moved);  // the buffer is really exercised
  ts::save(a, dir.file("a.safetensors"));

  Model b{Seed{2}};
  BOOST_TEST(snapshot(a) != snapshot(b));
  ts::load(b, dir.file("a.safetensors"));
  BOOST_TEST(snapshot(a) == snapshot(b));

  auto [tokens, targets] = batch();
  Model::Saved sa, sb;
  BOOST_TEST(a.forward(tokens, targets, sa).loss == b.forward(tokens, targets, sb).loss);

  // The file holds exactly the model's names, and says what it is.
  const auto file = ts::io::SafetensorsFile::open(dir.file("a.safetensors"));
  std::set<std::string> names;
  a.visit_weights([&](std::string_view n, auto&) { names.emplace(n); });
  const std::vector<std::string> in_file = file.names();
  BOOST_TEST(std::set<std::string>(in_file.begin(), in_file.end()) == names);
  BOOST_TEST(names.count("layers.1.ffn.router.expert_bias") == 1u);
  BOOST_TEST(names.count("lm_head.weight") == 1u);
  BOOST_TEST(file.metadata().at("tessera.model") == "decoder");
  BOOST_TEST(file.metadata().at("tessera.config").find("experts=4 top_k=2") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(refusals_name_the_tensor_and_leave_the_model_untouched) {
  TempDir dir;
  Model a{Seed{1}};
  train_step(a, 0.05f);
  const Entries entries(a);
  Model b{Seed{2}};
  const auto before = snapshot(b);
  const std::string where = "load_parameters '";

  {  // missing
    ts::io::save_safetensors(dir.file("missing.st"), entries.list("layers.1.attn.wq"));
    BOOST_CHECK_EXCEPTION(ts::load(b, dir.file("missing.st")), ts::Error,
                          message_has({where, "tensor 'layers.1.attn.wq' is missing from the file"}));
  }
  {  // extra
    auto list = entries.list();
    const auto extra = Tensor<float>::zeros({3});
    list.emplace_back("layers.0.attn.extra", extra);
    ts::io::save_safetensors(dir.file("extra.st"), list);
    BOOST_CHECK_EXCEPTION(
        ts::load(b, dir.file("extra.st")), ts::Error,
        message_has({"the file holds tensor 'layers.0.attn.extra', which the model does not have"}));
  }
  {  // mis-shaped
    auto list = entries.list("norm.weight");
    const auto wrong = Tensor<float>::zeros({15});
    list.emplace_back("norm.weight", wrong);
    ts::io::save_safetensors(dir.file("shape.st"), list);
    BOOST_CHECK_EXCEPTION(
        ts::load(b, dir.file("shape.st")), ts::Error,
        message_has({"tensor 'norm.weight' has shape [15] in the file, the model expects [16]"}));
  }
  {  // wrong dtype
    auto list = entries.list("lm_head.weight");
    const auto wide = Tensor<double>::zeros({Io::vocab, Io::d_model});
    list.emplace_back("lm_head.weight", wide);
    ts::io::save_safetensors(dir.file("dtype.st"), list);
    BOOST_CHECK_EXCEPTION(
        ts::load(b, dir.file("dtype.st")), ts::Error,
        message_has({"tensor 'lm_head.weight' is stored as F64, the model expects F32"}));
  }
  {  // another kind of model
    ts::io::save_safetensors(dir.file("kind.st"), entries.list(), {{"tessera.model", "encoder"}});
    BOOST_CHECK_EXCEPTION(ts::load(b, dir.file("kind.st")), ts::Error,
                          message_has({"the file holds a tessera encoder, not a decoder"}));
  }
  BOOST_TEST(snapshot(b) == before);  // every refusal left the model as it was
}

BOOST_AUTO_TEST_CASE(tied_and_untied_files_do_not_mix) {
  TempDir dir;
  Model untied{Seed{1}};
  ts::Decoder<IoTied> tied{Seed{1}};
  ts::save(untied, dir.file("untied.st"));
  ts::save(tied, dir.file("tied.st"));
  BOOST_CHECK_EXCEPTION(ts::load(tied, dir.file("untied.st")), ts::Error,
                        message_has({"'lm_head.weight', which the model does not have"}));
  BOOST_CHECK_EXCEPTION(ts::load(untied, dir.file("tied.st")), ts::Error,
                        message_has({"tensor 'lm_head.weight' is missing from the file"}));
  // The tied model's head is its embedding table: one tensor fewer, the same logits source.
  BOOST_TEST(&tied.lm_head_weight() == &tied.embedding().weight);
  BOOST_TEST(tied.parameter_count() == untied.parameter_count() - Io::vocab * Io::d_model);
}

BOOST_AUTO_TEST_CASE(sgd_steps_lower_the_loss) {
  Model m{Seed{3}};
  auto [tokens, targets] = batch();
  Model::Saved s;
  const double first = m.forward(tokens, targets, s).loss;
  BOOST_TEST(std::fabs(first - std::log(double(Io::vocab))) < 0.1);  // small initial logits
  for (int step = 0; step < 30; ++step) train_step(m, 0.3f);
  const double last = m.forward(tokens, targets, s).loss;
  std::printf("loss %.4f -> %.4f after 30 SGD steps\n", first, last);
  BOOST_TEST(last < 0.5 * first);
}

BOOST_AUTO_TEST_CASE(names_are_unique_and_follow_the_scheme) {
  Model m{Seed{1}};
  std::vector<std::string> names;
  int64_t elements = 0;
  m.visit_parameters([&](std::string_view n, nn::Parameter<float>& p) {
    names.emplace_back(n);
    elements += p.value.numel();
  });
  BOOST_TEST(std::set<std::string>(names.begin(), names.end()).size() == names.size());
  BOOST_TEST(names.front() == "embed.weight");
  BOOST_TEST(names[1] == "layers.0.norm1.weight");
  BOOST_TEST(names.back() == "lm_head.weight");
  BOOST_TEST(names[names.size() - 2] == "norm.weight");
  BOOST_TEST(std::count(names.begin(), names.end(), "layers.1.ffn.experts.3.w_up") == 1);
  BOOST_TEST(std::count(names.begin(), names.end(), "layers.1.ffn.shared_experts.0.w_down") == 1);
  BOOST_TEST(std::count(names.begin(), names.end(), "layers.0.attn.gate.weight") == 1);
  BOOST_TEST(std::count(names.begin(), names.end(), "layers.0.ffn.w_gate") == 1);
  BOOST_TEST(elements == m.parameter_count());
  // zero_grad clears every gradient after a backward.
  auto [tokens, targets] = batch();
  Model::Saved s;
  (void)m.forward(tokens, targets, s);
  m.backward(s);
  m.zero_grad();
  double mass = 0.0;
  m.visit_parameters([&](std::string_view, nn::Parameter<float>& p) {
    for (int64_t i = 0; i < p.grad.numel(); ++i) mass += std::fabs(p.grad.data()[i]);
  });
  BOOST_TEST(mass == 0.0);
}
