// tests/train/test_resume_kill.cpp — a training run killed with SIGKILL and resumed from its
// checkpoints ends bit for bit where an uninterrupted run ends.
//
// The run is a real child process (train_resume_helper, fork + exec), so nothing of the killed
// process survives but its files: no destructor runs, no buffer is flushed, the kill may land
// mid-step or mid-checkpoint. Compared with an uninterrupted run of the same program:
//   * the final model file and optimizer-state file, byte for byte (every weight, the MoE bias
//     buffer, every moment and fp32 master);
//   * the loss of every step (hex floats), including steps the killed run had already done
//     past its last checkpoint and the resumed run did again.
// Cases: kill right after checkpoint k is reported; kill at an arbitrary moment (a few ms after a
// report, so usually inside a step or a save); and kill, then truncate the newest checkpoint's
// weights, so the resumed run must refuse it (saying why on stderr) and use the previous one.
// Each for FP32 and for BF16Mixed (whose fp32 masters are part of the state).
#define BOOST_TEST_MODULE test_resume_kill
#include <boost/test/unit_test.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "tessera/train/checkpoint.hpp"
#include "tessera/train/token_data.hpp"
#include "tiny_model.hpp"

#ifndef TESSERA_TRAIN_HELPER
#error "TESSERA_TRAIN_HELPER must name the train_resume_helper executable"
#endif

namespace fs = std::filesystem;
namespace tr = tessera::train;

namespace {

constexpr long kSteps = 10;

struct Child {
  pid_t pid = -1;
  FILE* out = nullptr;  // the child's stdout
};

Child spawn(const std::vector<std::string>& args, const fs::path& stderr_file) {
  int fds[2];
  BOOST_TEST_REQUIRE(::pipe(fds) == 0);
  const pid_t pid = ::fork();
  BOOST_TEST_REQUIRE(pid >= 0);
  if (pid == 0) {
    ::dup2(fds[1], STDOUT_FILENO);
    ::close(fds[0]);
    ::close(fds[1]);
    if (FILE* e = std::fopen(stderr_file.c_str(), "a")) ::dup2(fileno(e), STDERR_FILENO);
    // One thread: the tiny model's OpenMP regions only wait for a busy machine's cores (10x
    // slower under load), and the results do not depend on the thread count anyway.
    ::setenv("OMP_NUM_THREADS", "1", 1);
    std::vector<char*> argv;
    static std::string exe = TESSERA_TRAIN_HELPER;
    argv.push_back(exe.data());
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(exe.c_str(), argv.data());
    std::_Exit(127);
  }
  ::close(fds[1]);
  return {pid, ::fdopen(fds[0], "r")};
}

int wait_status(Child& c) {
  int status = 0;
  ::waitpid(c.pid, &status, 0);
  if (c.out) std::fclose(c.out);
  c.out = nullptr;
  return status;
}

// Reads the child's "saved <k>" lines until k reaches `step`; false if it exited first.
bool wait_for_saved(Child& c, long step) {
  char line[128];
  while (std::fgets(line, sizeof line, c.out)) {
    long k = -1;
    if (std::sscanf(line, "saved %ld", &k) == 1 && k >= step) return true;
  }
  return false;
}

struct Run {
  fs::path dir, ckpt, out, losses, err;
  explicit Run(const fs::path& d) : dir(d), ckpt(d / "ckpt"), out(d / "out"), losses(d / "losses.txt"), err(d / "stderr.txt") {
    fs::create_directories(d);
  }
  std::vector<std::string> args(const fs::path& shard, const std::string& recipe, bool resume) const {
    std::vector<std::string> a = {"--data", shard.string(), "--dir", ckpt.string(), "--steps",
                                  std::to_string(kSteps), "--losses", losses.string(), "--out-dir",
                                  out.string(), "--recipe", recipe};
    if (resume) a.push_back("--resume");
    return a;
  }
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// step -> every loss recorded for it (a resumed run records some steps twice).
std::map<long, std::vector<std::string>> losses_of(const fs::path& p) {
  std::map<long, std::vector<std::string>> m;
  std::ifstream in(p);
  long step;
  std::string hex;
  while (in >> step >> hex) m[step].push_back(hex);
  return m;
}

void run_to_end(const Run& r, const fs::path& shard, const std::string& recipe, bool resume) {
  Child c = spawn(r.args(shard, recipe, resume), r.err);
  while (wait_for_saved(c, kSteps + 1)) {
  }
  const int st = wait_status(c);
  BOOST_TEST_REQUIRE((WIFEXITED(st) && WEXITSTATUS(st) == 0),
                     "helper failed; stderr: " << slurp(r.err));
}

void kill_at(const Run& r, const fs::path& shard, const std::string& recipe, long step, int delay_us) {
  Child c = spawn(r.args(shard, recipe, false), r.err);
  BOOST_TEST_REQUIRE(wait_for_saved(c, step), "helper ended before step " << step);
  if (delay_us > 0) ::usleep(static_cast<useconds_t>(delay_us));
  ::kill(c.pid, SIGKILL);
  const int st = wait_status(c);
  BOOST_TEST_REQUIRE((WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL), "the child was not killed");
}

void compare(const Run& ref, const Run& r) {
  BOOST_TEST((slurp(ref.out / "model.safetensors") == slurp(r.out / "model.safetensors")),
             "final weights differ from the uninterrupted run");
  BOOST_TEST((slurp(ref.out / "optimizer.safetensors") == slurp(r.out / "optimizer.safetensors")),
             "final optimizer state differs from the uninterrupted run");
  const auto a = losses_of(ref.losses), b = losses_of(r.losses);
  BOOST_TEST(a.size() == static_cast<std::size_t>(kSteps));
  BOOST_TEST(b.size() == a.size(), "every step has a recorded loss");
  for (const auto& [step, vals] : b)
    for (const auto& v : vals)
      BOOST_TEST(v == a.at(step).at(0), "step " << step << ": loss " << v << " vs " << a.at(step).at(0));
}

fs::path make_shard(const fs::path& dir) {
  std::string text = tessera::test::read_fortunes(tessera::test::kEnglishFortunes).substr(0, 200000);
  std::vector<std::int32_t> ids;
  for (unsigned char c : text) ids.push_back(c);
  tr::TokenShardWriter w(dir / "fortunes.tok", 256);
  w.append(ids);
  w.finish();
  return dir / "fortunes.tok";
}

void kill_and_resume(const std::string& recipe) {
  if (!fs::is_regular_file(tessera::test::kEnglishFortunes)) {
    std::cout << "TESSERA_SKIP: " << tessera::test::kEnglishFortunes
              << " is missing (apt-get install fortunes)" << std::endl;
    return;
  }
  const fs::path root = fs::temp_directory_path() /
                        ("tessera_resume_kill_" + recipe + "_" + std::to_string(::getpid()));
  fs::remove_all(root);
  fs::create_directories(root);
  const fs::path shard = make_shard(root);

  const Run ref(root / "uninterrupted");
  run_to_end(ref, shard, recipe, false);
  BOOST_TEST_REQUIRE(fs::exists(ref.out / "model.safetensors"));

  {  // killed just after checkpoint 4 was reported
    const Run r(root / "after_save");
    kill_at(r, shard, recipe, 4, 0);
    run_to_end(r, shard, recipe, true);
    BOOST_TEST(slurp(r.err).find("resumed from step") != std::string::npos, slurp(r.err));
    compare(ref, r);
  }
  {  // killed at an arbitrary moment, usually inside a step or a save
    const Run r(root / "anywhere");
    kill_at(r, shard, recipe, 3, 7000);
    run_to_end(r, shard, recipe, true);
    compare(ref, r);
  }
  {  // killed, then the newest checkpoint's weights truncated: refused, the previous one used
    const Run r(root / "corrupt");
    kill_at(r, shard, recipe, 6, 0);
    tr::CheckpointManager probe(r.ckpt, 3);
    const auto all = probe.list();
    BOOST_TEST_REQUIRE(all.size() >= 2u);
    const fs::path victim = all.front().second / "model.safetensors";
    fs::resize_file(victim, fs::file_size(victim) / 2);
    run_to_end(r, shard, recipe, true);
    const std::string err = slurp(r.err);
    BOOST_TEST(err.find("refused: model.safetensors has") != std::string::npos, err);
    BOOST_TEST(err.find("resumed from step " + std::to_string(all[1].first)) != std::string::npos, err);
    compare(ref, r);
  }
  fs::remove_all(root);
}

}  // namespace

BOOST_AUTO_TEST_CASE(fp32_killed_and_resumed_is_bit_identical) { kill_and_resume("fp32"); }

BOOST_AUTO_TEST_CASE(bf16_mixed_killed_and_resumed_is_bit_identical) { kill_and_resume("bf16-mixed"); }
