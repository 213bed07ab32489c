// tests/train/test_token_data.cpp — token shards and the batch loader on real text: the English
// `fortunes` file and the Tang poems of fortunes-zh (Debian packages), as bytes and as ids of a
// BPE vocabulary trained on them. Compared against the token vectors kept in memory by the
// test: every id read back through the memory map, every window, the shuffle (a permutation
// per epoch, fixed by the seed, another for another epoch or seed), seek/resume, the fixed
// split, and the refusals (truncated file, bad magic, id outside the vocabulary).
#define BOOST_TEST_MODULE test_token_data
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <string>
#include <vector>

#include "tessera/data/tokenizer_trainer.hpp"
#include "tessera/train/token_data.hpp"

namespace ts = tessera;
namespace tr = tessera::train;
namespace fs = std::filesystem;

namespace {

const char* kEnglish = "/usr/share/games/fortunes/fortunes";
const char* kTang = "/usr/share/games/fortunes/tang300";

bool have_text() {
  for (const char* p : {kEnglish, kTang})
    if (!fs::is_regular_file(p)) {
      std::cout << "TESSERA_SKIP: " << p << " is missing (apt-get install fortunes fortunes-zh)"
                << std::endl;
      return false;
    }
  return true;
}

std::string read_text(const char* path) {
  std::ifstream in(path, std::ios::binary);
  std::string text, line;
  while (std::getline(in, line))
    if (line != "%") text += line + "\n";
  return text;
}

fs::path temp_dir() {
  const fs::path d = fs::temp_directory_path() / ("tessera_token_data_" + std::to_string(::getpid()));
  fs::create_directories(d);
  return d;
}

template <class Id>
fs::path write_shard(const fs::path& p, const std::vector<Id>& ids, std::uint64_t vocab) {
  tr::TokenShardWriter w(p, vocab);
  // In uneven pieces, as a tokenizer streaming documents would append them.
  std::size_t off = 0, piece = 1;
  while (off < ids.size()) {
    const std::size_t n = std::min(piece, ids.size() - off);
    w.append(std::span<const Id>(ids.data() + off, n));
    off += n;
    piece = piece * 3 + 1;
  }
  BOOST_TEST(w.finish() == ids.size());
  return p;
}

}  // namespace

BOOST_AUTO_TEST_CASE(bytes_round_trip_through_uint16_shard) {
  if (!have_text()) return;
  const std::string text = read_text(kEnglish);
  std::vector<std::int32_t> ids(text.begin(), text.end());
  for (auto& x : ids) x &= 0xff;
  const fs::path d = temp_dir();
  write_shard(d / "bytes.tok", ids, 256);
  BOOST_TEST(fs::file_size(d / "bytes.tok") == tr::kShardHeaderBytes + 2 * ids.size());
  const tr::TokenShard s = tr::TokenShard::open(d / "bytes.tok");
  BOOST_TEST(s.width() == 2u);
  BOOST_TEST(s.vocab() == 256u);
  BOOST_TEST_REQUIRE(s.size() == ids.size());
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < ids.size(); ++i) mismatches += s[i] != static_cast<std::uint32_t>(ids[i]);
  BOOST_TEST(mismatches == 0u);

  // Windows of T + 1 at stride T, in order, equal the slices of the text.
  const tr::TokenDataset data({d / "bytes.tok"});
  const std::int64_t T = 64;
  BOOST_TEST(data.windows(T) == (ids.size() - 1) / T);
  auto loader = tr::BatchLoader::sequential(data, T, 3);
  for (int b = 0; b < 4; ++b) {
    const ts::Tensor<std::int32_t> batch = loader.next();
    for (int r = 0; r < 3; ++r) {
      const std::size_t w = static_cast<std::size_t>(b * 3 + r);
      BOOST_TEST(std::equal(batch.data() + r * (T + 1), batch.data() + (r + 1) * (T + 1),
                            ids.begin() + static_cast<std::ptrdiff_t>(w * T)));
    }
  }
  fs::remove_all(d);
}

BOOST_AUTO_TEST_CASE(bpe_ids_in_uint32_and_uint16_shards) {
  if (!have_text()) return;
  const std::string tang = read_text(kTang), english = read_text(kEnglish).substr(0, 200000);
  ts::data::BpeTrainerOptions opt;
  opt.vocab_size = 1500;
  ts::data::BpeTrainer trainer(opt);
  trainer.add_text(tang);
  trainer.add_text(english);
  const auto tok = trainer.train();
  const std::vector<std::uint32_t> a = tok.encode(tang), b = tok.encode(english);
  BOOST_TEST(tok.decode(a) == tang);  // real ids of real text
  const fs::path d = temp_dir();
  // Vocabulary above 65536 forces 4-byte ids (the ids themselves are the BPE's).
  write_shard(d / "tang.tok", a, 100000);
  write_shard(d / "english.tok", b, 100000);
  const tr::TokenDataset data({d / "tang.tok", d / "english.tok"});
  BOOST_TEST(data.shards()[0].width() == 4u);
  BOOST_TEST(data.tokens() == a.size() + b.size());
  const std::int64_t T = 50;
  const std::uint64_t wa = (a.size() - 1) / T, wb = (b.size() - 1) / T;
  BOOST_TEST(data.windows(T) == wa + wb);
  // The first window of the second shard starts at its own first id (no window crosses shards).
  std::vector<std::int32_t> win(T + 1);
  data.window(wa, T, win.data());
  BOOST_TEST(std::equal(win.begin(), win.end(), b.begin(),
                        [](std::int32_t x, std::uint32_t y) { return static_cast<std::uint32_t>(x) == y; }));
  data.window(wa - 1, T, win.data());
  BOOST_TEST(static_cast<std::uint32_t>(win[0]) == a[(wa - 1) * T]);

  // The same ids with their true vocabulary fit uint16, and read back equal.
  write_shard(d / "tang16.tok", a, tok.vocab_size());
  const tr::TokenShard s16 = tr::TokenShard::open(d / "tang16.tok");
  BOOST_TEST(s16.width() == 2u);
  std::vector<std::int32_t> all(a.size());
  s16.copy(0, a.size(), all.data());
  BOOST_TEST(std::equal(all.begin(), all.end(), a.begin(),
                        [](std::int32_t x, std::uint32_t y) { return static_cast<std::uint32_t>(x) == y; }));
  fs::remove_all(d);
}

BOOST_AUTO_TEST_CASE(shuffle_is_a_seeded_permutation_and_resumes) {
  if (!have_text()) return;
  const std::string text = read_text(kTang);
  std::vector<std::int32_t> ids;
  for (unsigned char c : text) ids.push_back(c);
  const fs::path d = temp_dir();
  write_shard(d / "t.tok", ids, 256);
  const tr::TokenDataset data({d / "t.tok"});
  const std::int64_t T = 32, B = 4;
  const auto split = tr::split_windows(data.windows(T), 0.1);
  BOOST_TEST(split.train.end == split.validation.begin);
  BOOST_TEST(split.validation.end == data.windows(T));
  BOOST_TEST(split.validation.size() ==
             static_cast<std::uint64_t>(0.1 * static_cast<double>(data.windows(T)) + 0.5));

  tr::BatchLoader a(data, T, B, ts::Seed{11}, split.train), b(data, T, B, ts::Seed{11}, split.train),
      c(data, T, B, ts::Seed{12}, split.train);
  BOOST_TEST(a.order() == b.order());
  BOOST_TEST(a.order() != c.order());
  // A permutation of the training windows: each once, none from the validation range.
  std::vector<std::uint64_t> sorted = a.order();
  std::sort(sorted.begin(), sorted.end());
  for (std::uint64_t i = 0; i < sorted.size(); ++i) BOOST_TEST_REQUIRE(sorted[i] == i);
  const auto first_epoch = a.order();

  // Draw a few batches, remember the position, draw more; a fresh loader seeked to the
  // position must draw the same later batches, across the epoch boundary too.
  const std::uint64_t per_epoch = split.train.size() / B + 3;
  for (std::uint64_t k = 0; k < per_epoch - 5; ++k) a.next();
  const tr::LoaderPosition pos = a.position();
  std::vector<std::vector<std::int32_t>> later;
  for (int k = 0; k < 10; ++k) {
    auto t = a.next();
    later.emplace_back(t.data(), t.data() + t.numel());
  }
  BOOST_TEST(a.position().epoch == 1u);
  BOOST_TEST(a.order() != first_epoch);  // a new order for the new epoch
  tr::BatchLoader resumed(data, T, B, ts::Seed{11}, split.train);
  resumed.seek(pos);
  for (int k = 0; k < 10; ++k) {
    auto t = resumed.next();
    BOOST_TEST(std::vector<std::int32_t>(t.data(), t.data() + t.numel()) == later[k]);
  }
  fs::remove_all(d);
}

BOOST_AUTO_TEST_CASE(refusals) {
  const fs::path d = temp_dir();
  const std::vector<std::int32_t> ids = {1, 2, 3, 4, 5, 6, 7, 8};
  write_shard(d / "ok.tok", ids, 10);
  // Truncated: one id short.
  fs::copy_file(d / "ok.tok", d / "cut.tok");
  fs::resize_file(d / "cut.tok", fs::file_size(d / "ok.tok") - 2);
  BOOST_CHECK_EXCEPTION(tr::TokenShard::open(d / "cut.tok"), ts::Error, [](const ts::Error& e) {
    return std::string(e.what()).find("header says 8 ids of 2 bytes") != std::string::npos;
  });
  {
    std::ofstream out(d / "junk.tok", std::ios::binary);
    out << std::string(64, 'x');
  }
  BOOST_CHECK_EXCEPTION(tr::TokenShard::open(d / "junk.tok"), ts::Error, [](const ts::Error& e) {
    return std::string(e.what()).find("bad magic") != std::string::npos;
  });
  {
    tr::TokenShardWriter w(d / "bad.tok", 5);
    const std::vector<std::int32_t> bad = {1, 7};
    BOOST_CHECK_EXCEPTION(w.append(bad), ts::Error, [](const ts::Error& e) {
      return std::string(e.what()).find("id 7 at position 1 is outside the vocabulary of 5") !=
             std::string::npos;
    });
  }  // unfinished: nothing left behind
  BOOST_TEST(!fs::exists(d / "bad.tok"));
  std::size_t leftovers = 0;
  for (const auto& e : fs::directory_iterator(d)) leftovers += e.path().filename().string().starts_with(".");
  BOOST_TEST(leftovers == 0u);
  fs::remove_all(d);
}
