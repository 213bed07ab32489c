// tests/train/test_checkpoint.cpp — the checkpoint protocol in one process: a round trip is bit
// exact (weights, MoE bias buffer, optimizer moments, step count, state JSON); only the newest N
// are kept; leftovers of an unfinished save are removed; and each kind of damage — weights cut
// short, one flipped bit in the optimizer file, an edited manifest, a truncated manifest, a
// missing file — is refused with its own message while the previous good checkpoint is loaded
// (checked bit for bit against a copy of the weights taken when it was saved).
#define BOOST_TEST_MODULE test_checkpoint
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "tessera/train/checkpoint.hpp"
#include "tessera/train/optimizer.hpp"
#include "tiny_model.hpp"

namespace ts = tessera;
namespace tr = tessera::train;
namespace fs = std::filesystem;

namespace {

using Model = ts::Decoder<ts::test::TinyTrainR1>;

// Every weight and optimizer-state byte, concatenated: equal iff bit-identical.
std::string snapshot(Model& m, tr::AdamW<float>& opt) {
  std::string s;
  m.visit_weights([&](std::string_view, auto& t) {
    s.append(reinterpret_cast<const char*>(t.data()), t.numel() * sizeof(*t.data()));
  });
  opt.visit_state([&](std::string_view, ts::Tensor<float>& t) {
    s.append(reinterpret_cast<const char*>(t.data()), t.numel() * sizeof(float));
  });
  return s + "#" + std::to_string(opt.steps());
}

// A real training step on bytes of English text, so moments and the bias buffer are non-zero.
void train_step(Model& m, tr::AdamW<float>& opt, int k) {
  const std::string text = "And God said, Let there be light: and there was light. Step " +
                           std::to_string(k) + " of a test that trains on a sentence.";
  auto seq = ts::Tensor<std::int32_t>::empty({2, 33});
  for (int i = 0; i < 66; ++i) seq.data()[i] = static_cast<unsigned char>(text[(i + 5 * k) % text.size()]);
  const auto b = ts::models::next_token_batch(seq);
  Model::Saved saved;
  m.forward(b.tokens, b.targets, saved);
  m.zero_grad();
  m.backward(saved);
  opt.step(m, 1e-2);
  m.update_balance(saved);
}

fs::path fresh_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("tessera_ckpt_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  return d;
}

void flip_bit(const fs::path& p, std::uintmax_t offset) {
  std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(offset));
  char c;
  f.get(c);
  f.seekp(static_cast<std::streamoff>(offset));
  f.put(static_cast<char>(c ^ 0x10));
}

}  // namespace

BOOST_AUTO_TEST_CASE(round_trip_is_bit_exact_and_old_ones_are_pruned) {
  const fs::path dir = fresh_dir("roundtrip");
  Model m{ts::Seed{3}};
  tr::AdamW<float> opt;
  tr::CheckpointManager ckpt(dir, 2);
  std::vector<std::string> snaps;
  for (int k = 1; k <= 4; ++k) {
    train_step(m, opt, k);
    ckpt.save(k, m, opt, {{"note", "step " + std::to_string(k)}, {"rng", {{"position", 40 + k}}}});
    snaps.push_back(snapshot(m, opt));
  }
  const auto list = ckpt.list();
  BOOST_TEST_REQUIRE(list.size() == 2u);
  BOOST_TEST(list[0].first == 4);
  BOOST_TEST(list[1].first == 3);
  BOOST_TEST(list[0].second.filename() == "step-00000004");

  // The bias buffer moved (so the weights file really carries non-parameter state).
  bool bias_nonzero = false;
  m.visit_buffers([&](std::string_view, auto& t) {
    for (int64_t i = 0; i < t.numel(); ++i) bias_nonzero |= t.data()[i] != 0;
  });
  BOOST_TEST(bias_nonzero);

  Model other{ts::Seed{99}};
  tr::AdamW<float> opt2;
  auto got = ckpt.load_latest(other, opt2, nullptr);
  BOOST_TEST_REQUIRE(got.has_value());
  BOOST_TEST(got->step == 4);
  BOOST_TEST(got->state["note"] == "step 4");
  BOOST_TEST(got->state["rng"]["position"] == 44);
  BOOST_TEST((snapshot(other, opt2) == snaps[3]));

  // Saving the same step again replaces it (a resumed run re-saving where it resumed).
  ckpt.save(4, m, opt, {{"note", "again"}});
  BOOST_TEST(ckpt.load_latest(other, opt2, nullptr)->state["note"] == "again");

  // A save that a killed process never finished is cleaned up when the directory is opened.
  fs::create_directories(dir / ".tmp-step-00000009-12345");
  tr::CheckpointManager reopened(dir, 2);
  BOOST_TEST(!fs::exists(dir / ".tmp-step-00000009-12345"));
  fs::remove_all(dir);
}

BOOST_AUTO_TEST_CASE(damaged_checkpoints_are_refused_and_the_previous_one_is_used) {
  const fs::path dir = fresh_dir("damage");
  Model m{ts::Seed{4}};
  tr::AdamW<float> opt;
  tr::CheckpointManager ckpt(dir, 10);
  std::vector<std::string> snaps;
  for (int k = 1; k <= 6; ++k) {
    train_step(m, opt, k);
    ckpt.save(k, m, opt, {{"k", k}});
    snaps.push_back(snapshot(m, opt));
  }
  struct Damage {
    const char* what;
    std::string expect;  // in the refusal message
  };
  auto load_expecting = [&](int expect_step, const std::string& expect_msg) {
    Model fresh{ts::Seed{100}};
    tr::AdamW<float> o;
    std::vector<std::string> warnings;
    auto got = ckpt.load_latest(fresh, o, [&](const std::string& w) { warnings.push_back(w); });
    BOOST_TEST_REQUIRE(got.has_value());
    BOOST_TEST(got->step == expect_step);
    BOOST_TEST((snapshot(fresh, o) == snaps[static_cast<std::size_t>(expect_step - 1)]));
    BOOST_TEST_REQUIRE(!warnings.empty());
    BOOST_TEST(warnings.back().find(expect_msg) != std::string::npos, warnings.back());
  };
  auto step_dir = [&](int k) { return dir / tr::CheckpointManager::name_of(k); };

  // 6: weights cut in half.
  fs::resize_file(step_dir(6) / "model.safetensors", fs::file_size(step_dir(6) / "model.safetensors") / 2);
  load_expecting(5, "step-00000006 refused: model.safetensors has");
  // 5: one bit flipped in the middle of the optimizer state (same size: only the hash sees it).
  flip_bit(step_dir(5) / "optimizer.safetensors", fs::file_size(step_dir(5) / "optimizer.safetensors") / 2);
  load_expecting(4, "optimizer.safetensors has xxHash64");
  // 4: the manifest edited by hand (another step number), still valid JSON.
  {
    std::ifstream in(step_dir(4) / "manifest.json");
    nlohmann::json j = nlohmann::json::parse(in);
    j["step"] = 40;
    std::ofstream(step_dir(4) / "manifest.json") << j.dump(1);
  }
  load_expecting(3, "manifest.json fails its own checksum");
  // 3: the manifest cut short.
  fs::resize_file(step_dir(3) / "manifest.json", 20);
  load_expecting(2, "manifest.json is not valid JSON");
  // 2: a file missing.
  fs::remove(step_dir(2) / "optimizer.safetensors");
  load_expecting(1, "optimizer.safetensors is missing");
  // Loading a damaged directory by name throws the same reason.
  Model x{ts::Seed{1}};
  tr::AdamW<float> ox;
  BOOST_CHECK_EXCEPTION(tr::CheckpointManager::load(step_dir(6), x, ox), ts::Error,
                        [](const ts::Error& e) {
                          return std::string(e.what()).find("(truncated?)") != std::string::npos;
                        });
  // 1: damaged too: nothing usable, said through the warnings, and no load.
  flip_bit(step_dir(1) / "model.safetensors", 100);
  std::vector<std::string> warnings;
  Model fresh{ts::Seed{100}};
  tr::AdamW<float> o;
  const std::string before = [&] {
    std::string s;
    fresh.visit_weights([&](std::string_view, auto& t) {
      s.append(reinterpret_cast<const char*>(t.data()), t.numel() * sizeof(*t.data()));
    });
    return s;
  }();
  BOOST_TEST(!ckpt.load_latest(fresh, o, [&](const std::string& w) { warnings.push_back(w); }).has_value());
  BOOST_TEST(warnings.size() == 6u);
  std::string after;
  fresh.visit_weights([&](std::string_view, auto& t) {
    after.append(reinterpret_cast<const char*>(t.data()), t.numel() * sizeof(*t.data()));
  });
  BOOST_TEST((after == before), "a refused checkpoint leaves the model untouched");
  fs::remove_all(dir);
}

BOOST_AUTO_TEST_CASE(a_checkpoint_of_another_optimizer_is_an_error) {
  const fs::path dir = fresh_dir("otheropt");
  Model m{ts::Seed{5}};
  tr::Sgd<float> sgd;
  sgd.init(m);
  tr::CheckpointManager ckpt(dir, 1);
  ckpt.save(1, m, sgd, {});
  tr::AdamW<float> adam;
  BOOST_CHECK_EXCEPTION(ckpt.load_latest(m, adam, nullptr), ts::Error, [](const ts::Error& e) {
    return std::string(e.what()).find("written by optimizer 'sgd', this run uses 'adamw'") !=
           std::string::npos;
  });
  fs::remove_all(dir);
}
