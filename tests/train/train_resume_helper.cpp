// tests/train/train_resume_helper.cpp — a small training run that test_resume_kill starts as a
// child process and kills with SIGKILL. It trains TinyTrainR1 on a token shard, checkpoints
// after every step (keeping 3), and
//   * prints "saved <step>" on stdout after each checkpoint (the parent waits for a line to
//     choose its moment);
//   * appends "<step> <loss as hex float>" to --losses after each step (a killed run leaves
//     lines that the resumed run repeats; they must agree bit for bit);
//   * with --resume, first loads the newest good checkpoint (reporting refused ones on stderr);
//   * writes the final weights and optimizer state to --out-dir when it reaches --steps.
// Usage: train_resume_helper --data SHARD --dir CKPT --steps N --losses FILE --out-dir DIR
//                            [--resume] [--recipe fp32|bf16-mixed]
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

#include "tessera/io/safetensors.hpp"
#include "tessera/train/checkpoint.hpp"
#include "tessera/train/schedule.hpp"
#include "tessera/train/token_data.hpp"
#include "tessera/train/trainer.hpp"
#include "tiny_model.hpp"

namespace ts = tessera;
namespace tr = tessera::train;

namespace {

struct Args {
  std::string data, dir, losses, out_dir, recipe = "fp32";
  long steps = 0;
  bool resume = false;
};

template <class Recipe>
int run(const Args& a) {
  using Model = ts::Decoder<tr::WithRecipe<ts::test::TinyTrainR1, Recipe>>;
  Model model{ts::Seed{1}};
  tr::AdamWOptions ao;
  ao.weight_decay = 0.1;
  tr::AdamW<typename Model::value_type> opt(ao);
  const tr::TokenDataset data({a.data});
  const auto split = tr::split_windows(data.windows(32), 0.1);
  tr::BatchLoader loader(data, 32, 4, ts::Seed{5}, split.train);
  tr::TrainerOptions to;
  to.micro_batches = 2;
  to.max_grad_norm = 0.5;
  tr::Trainer<Model, Recipe, decltype(opt)> trainer(model, opt, loader,
                                                    tr::WarmupCosine(3e-3, 3, a.steps, 3e-4), to);
  tr::CheckpointManager ckpt(a.dir, 3);
  if (a.resume) {
    auto found = ckpt.load_latest(model, opt, [](const std::string& m) { std::cerr << m << "\n"; });
    if (found) {
      trainer.restore(*found);
      std::cerr << "resumed from step " << found->step << "\n";
    } else {
      std::cerr << "no usable checkpoint: starting from step 0\n";
    }
  }
  std::ofstream losses(a.losses, std::ios::app);
  while (trainer.step_index() < a.steps) {
    const tr::StepReport r = trainer.step();
    char line[64];
    std::snprintf(line, sizeof line, "%lld %a\n", static_cast<long long>(r.step), r.loss);
    losses << line << std::flush;
    trainer.save(ckpt);
    std::printf("saved %lld\n", static_cast<long long>(trainer.step_index()));
    std::fflush(stdout);
  }
  std::filesystem::create_directories(a.out_dir);
  ts::save(model, std::filesystem::path(a.out_dir) / "model.safetensors");
  ts::io::save_parameters(std::filesystem::path(a.out_dir) / "optimizer.safetensors",
                          [&](auto f) { opt.visit_state(f); });
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << k << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (k == "--data") a.data = val();
    else if (k == "--dir") a.dir = val();
    else if (k == "--steps") a.steps = std::stol(val());
    else if (k == "--losses") a.losses = val();
    else if (k == "--out-dir") a.out_dir = val();
    else if (k == "--recipe") a.recipe = val();
    else if (k == "--resume") a.resume = true;
    else {
      std::cerr << "unknown argument " << k << "\n";
      return 2;
    }
  }
  try {
    if (a.recipe == "fp32") return run<tr::FP32>(a);
    if (a.recipe == "bf16-mixed") return run<tr::BF16Mixed>(a);
    std::cerr << "--recipe: fp32 or bf16-mixed\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
