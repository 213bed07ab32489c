// tessera/train/token_data.hpp — token shards on disk, and a loader that draws shuffled
// (B, T + 1) batches from them without reading the corpus into memory.
//
//   ts::train::TokenShardWriter w("train-000.tok", vocab);   // uint16 when vocab <= 65536
//   w.append(ids);  ...  w.finish();                          // atomic: temp file, fsync, rename
//   ts::train::TokenDataset data({"train-000.tok", "train-001.tok"});   // memory-mapped
//   ts::train::BatchLoader loader(data, /*seq_len=*/128, /*batch=*/8, ts::Seed{1});
//   ts::Tensor<int32_t> seq = loader.next();                 // (8, 129): inputs + targets
//   loader.position();  loader.seek(pos);                    // what a checkpoint saves
//
// Shard format (little-endian), 32-byte header then the ids:
//   0  char[8]  "TSTOKEN1"
//   8  u32      version (1)
//   12 u32      bytes per id: 2 (uint16) or 4 (uint32)
//   16 u64      number of ids
//   24 u64      vocabulary size (every id is below it)
//   32 ...      ids
// The file size must be exactly 32 + count * width: a truncated shard is refused on open, with
// the numbers. Ids are checked against the vocabulary as they are read (checking all of them
// on open would read the whole corpus, which is what a memory map is for avoiding).
//
// Why windows with stride T: window w covers ids [w T, w T + T + 1) of one shard, so consecutive
// windows overlap by one id and every id except a shard's first is predicted exactly once per
// epoch. Windows never cross shards (a shard is a unit of documents).
//
// Shuffling: the windows of epoch e are visited in a Fisher-Yates permutation drawn from the
// Philox stream (seed, e); the position is (epoch, index within the epoch), two integers, so a
// resumed run continues with exactly the batch it would have drawn. A loader may be given a
// range of windows ([begin, end)), which is how split_windows carves a fixed validation set
// out of one dataset; validation reads its windows in order (sequential()).
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::train {

inline constexpr char kShardMagic[8] = {'T', 'S', 'T', 'O', 'K', 'E', 'N', '1'};
inline constexpr std::uint32_t kShardVersion = 1;
inline constexpr std::size_t kShardHeaderBytes = 32;

// Writes one shard, streaming: ids are buffered a megabyte at a time, never held whole.
class TokenShardWriter {
 public:
  TokenShardWriter(std::filesystem::path path, std::uint64_t vocab)
      : path_(std::move(path)), vocab_(vocab), width_(vocab <= 65536 ? 2 : 4) {
    TESSERA_CHECK(vocab >= 1 && vocab <= (std::uint64_t{1} << 32), "TokenShardWriter '",
                  path_.string(), "': vocab ", vocab, " must be in [1, 2^32]");
    static std::atomic<unsigned> counter{0};
    const auto dir = path_.has_parent_path() ? path_.parent_path() : std::filesystem::path(".");
    // Built by appends: g++ 12 warns (-Wrestrict, a false positive) on the chain of operator+.
    std::string name = ".";
    name.append(path_.filename().string()).append(".tmp.").append(std::to_string(::getpid()));
    name.append(".").append(std::to_string(counter++));
    tmp_ = (dir / name).string();
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    TESSERA_CHECK(fd_ >= 0, "TokenShardWriter: cannot create '", tmp_, "': ", std::strerror(errno));
    buffer_.assign(kShardHeaderBytes, 0);  // the header is written last, over these zeros
  }
  TokenShardWriter(const TokenShardWriter&) = delete;
  TokenShardWriter& operator=(const TokenShardWriter&) = delete;
  ~TokenShardWriter() {
    if (fd_ >= 0) {  // not finished: leave nothing behind
      ::close(fd_);
      ::unlink(tmp_.c_str());
    }
  }

  template <class Id>
  void append(std::span<const Id> ids) {
    TESSERA_CHECK(fd_ >= 0, "TokenShardWriter '", path_.string(), "': append after finish");
    for (const Id id : ids) {
      const auto u = static_cast<std::uint64_t>(id);
      TESSERA_CHECK(id >= 0 && u < vocab_, "TokenShardWriter '", path_.string(), "': id ", u,
                    " at position ", count_, " is outside the vocabulary of ", vocab_);
      if (width_ == 2) {
        const auto v = static_cast<std::uint16_t>(u);
        push(&v, 2);
      } else {
        const auto v = static_cast<std::uint32_t>(u);
        push(&v, 4);
      }
      ++count_;
    }
    if (buffer_.size() >= (1u << 20)) flush();
  }
  template <class Id>
  void append(const std::vector<Id>& ids) {
    append(std::span<const Id>(ids));
  }

  // Writes the header, fsyncs and renames into place. Returns the number of ids.
  std::uint64_t finish() {
    flush();
    unsigned char header[kShardHeaderBytes] = {};
    std::memcpy(header, kShardMagic, 8);
    std::memcpy(header + 8, &kShardVersion, 4);
    std::memcpy(header + 12, &width_, 4);
    std::memcpy(header + 16, &count_, 8);
    std::memcpy(header + 24, &vocab_, 8);
    TESSERA_CHECK(::pwrite(fd_, header, kShardHeaderBytes, 0) == kShardHeaderBytes,
                  "TokenShardWriter: writing the header of '", tmp_, "' failed: ",
                  std::strerror(errno));
    TESSERA_CHECK(::fsync(fd_) == 0, "TokenShardWriter: fsync of '", tmp_, "' failed");
    ::close(fd_);
    fd_ = -1;
    TESSERA_CHECK(::rename(tmp_.c_str(), path_.c_str()) == 0, "TokenShardWriter: cannot move '",
                  tmp_, "' to '", path_.string(), "': ", std::strerror(errno));
    return count_;
  }

  std::uint32_t width() const { return width_; }

 private:
  void push(const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    buffer_.insert(buffer_.end(), b, b + n);
  }
  void flush() {
    std::size_t off = 0;
    while (off < buffer_.size()) {
      const ssize_t w = ::write(fd_, buffer_.data() + off, buffer_.size() - off);
      if (w < 0 && errno == EINTR) continue;
      TESSERA_CHECK(w > 0, "TokenShardWriter: writing '", tmp_, "' failed: ", std::strerror(errno));
      off += static_cast<std::size_t>(w);
    }
    buffer_.clear();
  }

  std::filesystem::path path_;
  std::string tmp_;
  std::uint64_t vocab_;
  std::uint32_t width_;
  std::uint64_t count_ = 0;
  int fd_ = -1;
  std::vector<unsigned char> buffer_;
};

// One shard, memory-mapped read-only: the kernel pages ids in as batches touch them.
class TokenShard {
 public:
  static TokenShard open(const std::filesystem::path& path) {
    TokenShard s;
    s.path_ = path.string();
    const std::string where = "token shard '" + s.path_ + "': ";
    const int fd = ::open(s.path_.c_str(), O_RDONLY | O_CLOEXEC);
    TESSERA_CHECK(fd >= 0, where, "cannot open: ", std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      fail(where, "cannot stat");
    }
    s.bytes_ = static_cast<std::size_t>(st.st_size);
    if (s.bytes_ > 0) {
      void* p = ::mmap(nullptr, s.bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
      ::close(fd);
      TESSERA_CHECK(p != MAP_FAILED, where, "mmap failed: ", std::strerror(errno));
      s.map_ = static_cast<const unsigned char*>(p);
    } else {
      ::close(fd);
    }
    TESSERA_CHECK(s.bytes_ >= kShardHeaderBytes, where, "file has ", s.bytes_,
                  " bytes, less than the ", kShardHeaderBytes, "-byte header");
    TESSERA_CHECK(std::memcmp(s.map_, kShardMagic, 8) == 0, where,
                  "bad magic (not a tessera token shard)");
    std::uint32_t version = 0;
    std::memcpy(&version, s.map_ + 8, 4);
    std::memcpy(&s.width_, s.map_ + 12, 4);
    std::memcpy(&s.count_, s.map_ + 16, 8);
    std::memcpy(&s.vocab_, s.map_ + 24, 8);
    TESSERA_CHECK(version == kShardVersion, where, "version ", version, ", expected ",
                  kShardVersion);
    TESSERA_CHECK(s.width_ == 2 || s.width_ == 4, where, "bytes per id is ", s.width_,
                  ", expected 2 or 4");
    TESSERA_CHECK(s.count_ <= (s.bytes_ - kShardHeaderBytes) / s.width_ &&
                      kShardHeaderBytes + s.count_ * s.width_ == s.bytes_,
                  where, "header says ", s.count_, " ids of ", s.width_, " bytes (",
                  kShardHeaderBytes + s.count_ * s.width_, " bytes with the header), the file has ",
                  s.bytes_, " bytes (truncated or padded)");
    return s;
  }

  TokenShard(TokenShard&& o) noexcept { *this = std::move(o); }
  TokenShard& operator=(TokenShard&& o) noexcept {
    if (this != &o) {
      unmap();
      path_ = std::move(o.path_);
      map_ = std::exchange(o.map_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
      width_ = o.width_;
      count_ = o.count_;
      vocab_ = o.vocab_;
    }
    return *this;
  }
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;
  ~TokenShard() { unmap(); }

  std::uint64_t size() const { return count_; }
  std::uint64_t vocab() const { return vocab_; }
  std::uint32_t width() const { return width_; }
  const std::string& path() const { return path_; }

  std::uint32_t operator[](std::uint64_t i) const {
    const unsigned char* p = map_ + kShardHeaderBytes + i * width_;
    if (width_ == 2) {
      std::uint16_t v;
      std::memcpy(&v, p, 2);
      return v;
    }
    std::uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
  }

  // ids [begin, begin + n) into out, each checked against the vocabulary.
  void copy(std::uint64_t begin, std::uint64_t n, std::int32_t* out) const {
    TESSERA_CHECK(begin <= count_ && n <= count_ - begin, "token shard '", path_, "': ids [",
                  begin, ", ", begin + n, ") are outside its ", count_, " ids");
    for (std::uint64_t i = 0; i < n; ++i) {
      const std::uint32_t v = (*this)[begin + i];
      TESSERA_CHECK(v < vocab_ && v <= 0x7fffffffu, "token shard '", path_, "': id ", v,
                    " at position ", begin + i, " is outside the vocabulary of ", vocab_);
      out[i] = static_cast<std::int32_t>(v);
    }
  }

 private:
  TokenShard() = default;
  void unmap() {
    if (map_ != nullptr) ::munmap(const_cast<unsigned char*>(map_), bytes_);
    map_ = nullptr;
  }

  std::string path_;
  const unsigned char* map_ = nullptr;
  std::size_t bytes_ = 0;
  std::uint32_t width_ = 0;
  std::uint64_t count_ = 0;
  std::uint64_t vocab_ = 0;
};

// Shards read as one collection of windows.
class TokenDataset {
 public:
  explicit TokenDataset(const std::vector<std::filesystem::path>& paths) {
    TESSERA_CHECK(!paths.empty(), "TokenDataset: no shards given");
    for (const auto& p : paths) {
      shards_.push_back(TokenShard::open(p));
      TESSERA_CHECK(shards_.back().vocab() == shards_.front().vocab(), "TokenDataset: shard '",
                    p.string(), "' has vocabulary ", shards_.back().vocab(), ", shard '",
                    shards_.front().path(), "' has ", shards_.front().vocab());
    }
  }

  std::uint64_t vocab() const { return shards_.front().vocab(); }
  std::uint64_t tokens() const {
    std::uint64_t n = 0;
    for (const auto& s : shards_) n += s.size();
    return n;
  }
  const std::vector<TokenShard>& shards() const { return shards_; }

  // Windows of seq_len + 1 ids at stride seq_len, shard by shard.
  std::uint64_t windows(std::int64_t seq_len) const {
    check_len(seq_len);
    std::uint64_t n = 0;
    for (const auto& s : shards_) n += windows_in(s, seq_len);
    return n;
  }

  // Window w into out[0 .. seq_len] (seq_len + 1 ids).
  void window(std::uint64_t w, std::int64_t seq_len, std::int32_t* out) const {
    check_len(seq_len);
    const std::uint64_t first = w;
    for (const auto& s : shards_) {
      const std::uint64_t k = windows_in(s, seq_len);
      if (w < k) {
        s.copy(w * static_cast<std::uint64_t>(seq_len), static_cast<std::uint64_t>(seq_len) + 1, out);
        return;
      }
      w -= k;
    }
    fail("TokenDataset: window ", first, " is beyond the last of ", windows(seq_len));
  }

 private:
  static std::uint64_t windows_in(const TokenShard& s, std::int64_t seq_len) {
    return s.size() <= 1 ? 0 : (s.size() - 1) / static_cast<std::uint64_t>(seq_len);
  }
  static void check_len(std::int64_t seq_len) {
    TESSERA_CHECK(seq_len >= 1, "TokenDataset: seq_len ", seq_len, " must be >= 1");
  }

  std::vector<TokenShard> shards_;
};

struct WindowRange {
  std::uint64_t begin = 0, end = 0;
  std::uint64_t size() const { return end - begin; }
};

// A fixed split: the last round(val_fraction * windows) windows (at least one) validate, the
// rest train. The split does not depend on any seed, so every run holds out the same windows.
struct WindowSplit {
  WindowRange train, validation;
};
inline WindowSplit split_windows(std::uint64_t windows, double val_fraction) {
  TESSERA_CHECK(val_fraction > 0 && val_fraction < 1, "split_windows: val_fraction ", val_fraction,
                " must lie in (0, 1)");
  TESSERA_CHECK(windows >= 2, "split_windows: need at least 2 windows, have ", windows);
  auto v = static_cast<std::uint64_t>(val_fraction * static_cast<double>(windows) + 0.5);
  v = std::clamp<std::uint64_t>(v, 1, windows - 1);
  return {{0, windows - v}, {windows - v, windows}};
}

// Where a loader is: the epoch, and the next index in that epoch's order.
struct LoaderPosition {
  std::uint64_t epoch = 0;
  std::uint64_t index = 0;
  friend bool operator==(const LoaderPosition&, const LoaderPosition&) = default;
};

class BatchLoader {
 public:
  BatchLoader(const TokenDataset& data, std::int64_t seq_len, std::int64_t batch, Seed seed,
              std::optional<WindowRange> range = std::nullopt, bool shuffle = true)
      : data_(&data), seq_len_(seq_len), batch_(batch), seed_(seed), shuffle_(shuffle) {
    const std::uint64_t all = data.windows(seq_len);
    range_ = range.value_or(WindowRange{0, all});
    TESSERA_CHECK(range_.begin < range_.end && range_.end <= all, "BatchLoader: window range [",
                  range_.begin, ", ", range_.end, ") is empty or beyond the dataset's ", all,
                  " windows of ", seq_len + 1, " ids");
    TESSERA_CHECK(batch >= 1, "BatchLoader: batch ", batch, " must be >= 1");
    build_order();
  }

  // Windows in epoch order, no shuffling: for validation.
  static BatchLoader sequential(const TokenDataset& data, std::int64_t seq_len, std::int64_t batch,
                                std::optional<WindowRange> range = std::nullopt) {
    return BatchLoader(data, seq_len, batch, Seed{0}, range, false);
  }

  // The next (batch, seq_len + 1) ids; crosses into the next epoch (a new order) when needed.
  Tensor<std::int32_t> next() {
    auto out = Tensor<std::int32_t>::empty({batch_, seq_len_ + 1});  // (B, T + 1)
    for (std::int64_t b = 0; b < batch_; ++b) {
      if (pos_.index == order_.size()) {
        ++pos_.epoch;
        pos_.index = 0;
        build_order();
      }
      data_->window(range_.begin + order_[pos_.index++], seq_len_, out.data() + b * (seq_len_ + 1));
    }
    return out;
  }

  LoaderPosition position() const { return pos_; }
  void seek(LoaderPosition p) {
    TESSERA_CHECK(p.index <= order_.size(), "BatchLoader::seek: index ", p.index,
                  " is beyond the ", order_.size(), " windows of an epoch");
    const bool new_epoch = p.epoch != pos_.epoch;
    pos_ = p;
    if (new_epoch) build_order();
  }

  std::uint64_t windows() const { return range_.size(); }
  std::int64_t batch() const { return batch_; }
  std::int64_t seq_len() const { return seq_len_; }
  // Windows visited in this epoch's order (index i of the epoch -> window, relative to the range).
  const std::vector<std::uint64_t>& order() const { return order_; }

 private:
  void build_order() {
    const std::uint64_t n = range_.size();
    order_.resize(n);
    for (std::uint64_t i = 0; i < n; ++i) order_[i] = i;
    if (!shuffle_) return;
    // Fisher-Yates from the end; j uniform in [0, i] from 32 Philox bits by multiply-shift
    // (bias below 2^-32 * n, irrelevant for shuffling windows).
    Philox rng(seed_, pos_.epoch);
    for (std::uint64_t i = n; i-- > 1;) {
      const std::uint64_t j = (static_cast<std::uint64_t>(rng.next_u32()) * (i + 1)) >> 32;
      std::swap(order_[i], order_[j]);
    }
  }

  const TokenDataset* data_;
  std::int64_t seq_len_, batch_;
  Seed seed_;
  bool shuffle_;
  WindowRange range_;
  LoaderPosition pos_;
  std::vector<std::uint64_t> order_;
};

}  // namespace tessera::train
