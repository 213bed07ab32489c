// tessera/train/checkpoint.hpp — checkpoints that survive a crash at any instant, are checked
// before they are trusted, and resume a run bit for bit.
//
//   ts::train::CheckpointManager ckpt("runs/r1", /*keep_last=*/3);
//   ckpt.save(step, model, optimizer, state_json);          // state: rng, data position, ...
//   if (auto found = ckpt.load_latest(model, optimizer, warn)) { step = found->step; ... }
//
// Layout: <dir>/step-00000120/{model.safetensors, optimizer.safetensors, manifest.json}.
//   model.safetensors      every tensor of model.visit_weights (parameters and buffers such as
//                          the MoE selection bias), as ts::save writes them
//   optimizer.safetensors  optimizer.visit_state: moments, fp32 master weights
//   manifest.json          {"format": "tessera-checkpoint", "version": 1, "step": 120,
//                           "files": {name: {"bytes": n, "xxh64": "..."}}, "state": {...},
//                           "checksum": xxh64 of this JSON without "checksum"}
//
// Why this protocol. A run may die at any instant (a kill, a power cut, a full disk):
//   * every file is written into a hidden directory <dir>/.tmp-step-...-<pid>, fsynced, the
//     manifest last; the directory is fsynced and then renamed to step-NNNNNNNN (atomic within a
//     file system) and the parent fsynced. A checkpoint directory therefore either does not
//     exist or holds everything. Leftover .tmp- directories of a dead run are removed on open.
//   * A step-* directory is still not trusted: load verifies the manifest's own checksum, then
//     the size and xxHash64 of each file it lists, before reading a byte into the model. A
//     truncated or bit-flipped checkpoint (a disk error, a copy cut short, a hand edit) is
//     refused with a message naming the file and what is wrong, and the previous checkpoint is
//     tried, down to the oldest kept; none valid means a fresh start, said loudly.
//   * Only the newest keep_last checkpoints stay; older ones are deleted after a save
//     succeeded, so the previous good one is always there when the newest turns out bad.
// Bit-identical resumption needs the whole state: weights and buffers, optimizer moments and
// masters (exact float bits: safetensors stores raw bytes), the optimizer's step count, the
// RNG position and the data loader's position (in `state`), and the step. The learning-rate
// schedule is a function of the step.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#if __has_include(<xxhash.h>)
#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL
#endif
#include <xxhash.h>
#define TESSERA_CHECKPOINT_HAVE_XXHASH 1
#endif

#include "tessera/core/error.hpp"
#include "tessera/io/safetensors.hpp"
#include "tessera/models/weights.hpp"

namespace tessera::train {

namespace checkpoint_detail {

inline std::string hex64(std::uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

// XXH64 (seed 0) of a byte string / of a whole file, streamed.
inline std::uint64_t xxh64(std::string_view bytes) {
#if defined(TESSERA_CHECKPOINT_HAVE_XXHASH)
  return XXH64(bytes.data(), bytes.size(), 0);
#else
  (void)bytes;
  fail("checkpoints need xxHash (install libxxhash-dev)");
#endif
}

inline std::uint64_t xxh64_file(const std::filesystem::path& path) {
#if defined(TESSERA_CHECKPOINT_HAVE_XXHASH)
  std::ifstream in(path, std::ios::binary);
  TESSERA_CHECK(in.is_open(), "checkpoint: cannot read '", path.string(), "'");
  XXH64_state_t state;
  XXH64_reset(&state, 0);
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto got = in.gcount();
    if (got > 0) XXH64_update(&state, buf.data(), static_cast<std::size_t>(got));
  }
  return XXH64_digest(&state);
#else
  (void)path;
  fail("checkpoints need xxHash (install libxxhash-dev)");
#endif
}

inline void fsync_path(const std::filesystem::path& p, bool directory) {
  const int fd = ::open(p.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return;  // best effort (some file systems refuse a directory fsync)
  (void)::fsync(fd);
  ::close(fd);
}

inline void write_file_synced(const std::filesystem::path& path, std::string_view bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  TESSERA_CHECK(fd >= 0, "checkpoint: cannot create '", path.string(), "': ", std::strerror(errno));
  std::size_t off = 0;
  while (off < bytes.size()) {
    const ssize_t w = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      const std::string why = std::strerror(errno);
      ::close(fd);
      fail("checkpoint: writing '", path.string(), "' failed: ", why);
    }
    off += static_cast<std::size_t>(w);
  }
  const bool ok = ::fsync(fd) == 0;
  ::close(fd);
  TESSERA_CHECK(ok, "checkpoint: fsync of '", path.string(), "' failed");
}

// The manifest's checksum covers its own JSON text without the "checksum" member (nlohmann
// dumps object keys sorted, so the text is a function of the content).
inline std::string manifest_checksum(nlohmann::json m) {
  m.erase("checksum");
  return hex64(xxh64(m.dump()));
}

}  // namespace checkpoint_detail

struct CheckpointInfo {
  std::filesystem::path dir;
  std::int64_t step = 0;
  nlohmann::json state;  // what save() was given
};

class CheckpointManager {
 public:
  static constexpr std::string_view kModelFile = "model.safetensors";
  static constexpr std::string_view kOptimizerFile = "optimizer.safetensors";
  static constexpr std::string_view kManifestFile = "manifest.json";

  CheckpointManager(std::filesystem::path dir, int keep_last) : dir_(std::move(dir)), keep_(keep_last) {
    TESSERA_CHECK(keep_last >= 1, "CheckpointManager: keep_last ", keep_last, " must be >= 1");
    std::filesystem::create_directories(dir_);
    for (const auto& e : std::filesystem::directory_iterator(dir_))
      if (e.is_directory() && e.path().filename().string().starts_with(".tmp-"))
        std::filesystem::remove_all(e.path());  // a save a dead process never finished
  }

  const std::filesystem::path& dir() const { return dir_; }

  static std::string name_of(std::int64_t step) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "step-%08lld", static_cast<long long>(step));
    return buf;
  }

  // Every step-* directory, newest first (valid or not).
  std::vector<std::pair<std::int64_t, std::filesystem::path>> list() const {
    std::vector<std::pair<std::int64_t, std::filesystem::path>> out;
    for (const auto& e : std::filesystem::directory_iterator(dir_)) {
      const std::string n = e.path().filename().string();
      if (!e.is_directory() || !n.starts_with("step-") || n.size() != 13) continue;
      try {
        out.emplace_back(std::stoll(n.substr(5)), e.path());
      } catch (...) {
      }
    }
    std::sort(out.begin(), out.end(), [](auto& a, auto& b) { return a.first > b.first; });
    return out;
  }

  template <class Model, class Optimizer>
  std::filesystem::path save(std::int64_t step, Model& model, Optimizer& optimizer,
                             const nlohmann::json& state) {
    namespace cd = checkpoint_detail;
    const std::string name = name_of(step);
    const std::filesystem::path tmp = dir_ / (".tmp-" + name + "-" + std::to_string(::getpid()));
    std::filesystem::remove_all(tmp);
    std::filesystem::create_directory(tmp);
    models::save(model, tmp / kModelFile);  // fsynced by the safetensors writer
    io::save_parameters(tmp / kOptimizerFile, [&](auto f) { optimizer.visit_state(f); },
                        {{"tessera.optimizer", std::string(Optimizer::kName)}});
    nlohmann::json m;
    m["format"] = "tessera-checkpoint";
    m["version"] = 1;
    m["step"] = step;
    m["optimizer"] = {{"name", std::string(Optimizer::kName)}, {"steps", optimizer.steps()}};
    m["state"] = state;
    for (std::string_view f : {kModelFile, kOptimizerFile}) {
      const auto p = tmp / f;
      m["files"][std::string(f)] = {{"bytes", std::filesystem::file_size(p)},
                                    {"xxh64", cd::hex64(cd::xxh64_file(p))}};
    }
    m["checksum"] = cd::manifest_checksum(m);
    cd::write_file_synced(tmp / kManifestFile, m.dump(1));
    cd::fsync_path(tmp, true);
    const std::filesystem::path final_dir = dir_ / name;
    if (std::filesystem::exists(final_dir)) {
      // Saving a step again (a resumed run passing the step it resumed from): move the old one
      // aside first, since rename cannot replace a non-empty directory.
      const auto old = dir_ / (".tmp-old-" + name + "-" + std::to_string(::getpid()));
      std::filesystem::rename(final_dir, old);
      std::filesystem::rename(tmp, final_dir);
      std::filesystem::remove_all(old);
    } else {
      std::filesystem::rename(tmp, final_dir);
    }
    cd::fsync_path(dir_, true);
    prune();
    return final_dir;
  }

  // Checks a checkpoint directory without loading it: the manifest parses, its checksum
  // matches, and every listed file has its recorded size and xxHash64. Returns the reason it
  // is refused, or nothing when it is good.
  static std::optional<std::string> verify(const std::filesystem::path& d, nlohmann::json* out = nullptr) {
    namespace cd = checkpoint_detail;
    const auto mpath = d / kManifestFile;
    if (!std::filesystem::exists(mpath)) return "its manifest.json is missing";
    nlohmann::json m;
    {
      std::ifstream in(mpath, std::ios::binary);
      std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      m = nlohmann::json::parse(text, nullptr, false);
      if (m.is_discarded() || !m.is_object()) return "manifest.json is not valid JSON (truncated?)";
    }
    if (m.value("format", "") != "tessera-checkpoint" || m.value("version", 0) != 1)
      return "manifest.json is not a version-1 tessera checkpoint manifest";
    if (!m.contains("checksum") || !m["checksum"].is_string() ||
        m["checksum"].get<std::string>() != cd::manifest_checksum(m))
      return "manifest.json fails its own checksum (edited or corrupted)";
    if (!m.contains("files") || !m["files"].is_object() || !m.contains("step"))
      return "manifest.json lacks 'files' or 'step'";
    for (std::string_view f : {kModelFile, kOptimizerFile}) {
      if (!m["files"].contains(std::string(f))) return "manifest.json does not list " + std::string(f);
      const auto& e = m["files"][std::string(f)];
      const auto p = d / f;
      std::error_code ec;
      const auto size = std::filesystem::file_size(p, ec);
      if (ec) return std::string(f) + " is missing";
      const auto want = e.value("bytes", std::uint64_t{0});
      if (size != want)
        return std::string(f) + " has " + std::to_string(size) + " bytes, the manifest recorded " +
               std::to_string(want) + " (truncated?)";
      const std::string sum = cd::hex64(cd::xxh64_file(p));
      if (sum != e.value("xxh64", std::string()))
        return std::string(f) + " has xxHash64 " + sum + ", the manifest recorded " +
               e.value("xxh64", std::string()) + " (corrupted)";
    }
    if (out) *out = std::move(m);
    return std::nullopt;
  }

  // Loads the newest checkpoint that verifies; each refused one is reported through warn
  // (one line naming the directory and the reason). Returns nothing when none is usable.
  template <class Model, class Optimizer>
  std::optional<CheckpointInfo> load_latest(Model& model, Optimizer& optimizer,
                                            const std::function<void(const std::string&)>& warn) {
    for (const auto& [step, d] : list()) {
      nlohmann::json m;
      if (auto why = verify(d, &m)) {
        if (warn) warn("checkpoint " + d.string() + " refused: " + *why);
        continue;
      }
      return load_verified(d, m, model, optimizer);
    }
    return std::nullopt;
  }

  // Loads one directory (verified first); throws with the reason if it is refused.
  template <class Model, class Optimizer>
  static CheckpointInfo load(const std::filesystem::path& d, Model& model, Optimizer& optimizer) {
    nlohmann::json m;
    if (auto why = verify(d, &m)) fail("checkpoint ", d.string(), " refused: ", *why);
    return load_verified(d, m, model, optimizer);
  }

 private:
  template <class Model, class Optimizer>
  static CheckpointInfo load_verified(const std::filesystem::path& d, const nlohmann::json& m,
                                      Model& model, Optimizer& optimizer) {
    TESSERA_CHECK(m["optimizer"].value("name", "") == Optimizer::kName, "checkpoint ", d.string(),
                  ": written by optimizer '", m["optimizer"].value("name", ""), "', this run uses '",
                  Optimizer::kName, "'");
    optimizer.init(model);
    // The files verified, so a failure below is a model or optimizer that does not fit them
    // (another config): an error, not a reason to fall back to an older checkpoint.
    models::load(model, d / kModelFile);
    io::load_parameters(d / kOptimizerFile, [&](auto f) { optimizer.visit_state(f); });
    optimizer.sync_model_from_master(model);
    optimizer.set_steps(m["optimizer"].value("steps", std::int64_t{0}));
    return {d, m["step"].get<std::int64_t>(), m.value("state", nlohmann::json::object())};
  }

  void prune() {
    const auto all = list();
    for (std::size_t i = static_cast<std::size_t>(keep_); i < all.size(); ++i)
      std::filesystem::remove_all(all[i].second);
  }

  std::filesystem::path dir_;
  int keep_;
};

}  // namespace tessera::train
