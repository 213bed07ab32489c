// tessera/data/tokenizer_trainer.hpp — trains a byte-level BPE tokenizer from text.
//
// Why it is built this way:
// - Words are counted once (the same pieces encode() will see: added tokens cut out, the
//   pre-tokeniser, the CJK policy), in parallel over OpenMP threads, so the merge loop works
//   on distinct words with counts rather than on the text.
// - The merge loop keeps pair counts and, for each pair, the words that contain it. A merge
//   only revisits those words and updates the counts of the pairs it destroys and creates, and
//   the next pair is taken from a max-heap whose stale entries are re-queued lazily. That is
//   what makes 100 MB train in minutes: each merge costs the size of its own neighbourhood,
//   not a pass over the corpus.
// - Ties are broken by the smaller (left id, right id), so training is deterministic and
//   independent of the thread count.
// - Special tokens get ids 0..k-1; the 256 bytes come next, then merges; user terms come last
//   as non-special added tokens, so they stay single tokens whatever the merges learnt
//   (the design's answer to domain terms). The result saves as a tokenizer.json that the
//   Hugging Face library loads and encodes identically (tests/data/test_tokenizer_hf.cpp).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <queue>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/data/bpe_tokenizer.hpp"

namespace tessera::data {

struct BpeTrainerOptions {
  std::size_t vocab_size = 32000;           // everything: specials + 256 bytes + merges + terms
  std::uint64_t min_pair_count = 2;         // a pair seen fewer times is never merged
  std::vector<std::string> special_tokens;  // e.g. "<|endoftext|>"; ids 0, 1, ...
  std::vector<std::string> terms;           // always single tokens (non-special added tokens)
  PreTokenizer pre_tokenizer = PreTokenizer::deepseek_v3();
};

struct BpeTrainerStats {
  std::uint64_t bytes = 0;  // text bytes counted
  std::size_t distinct_words = 0;
  std::size_t merges = 0;
  std::uint64_t last_merge_count = 0;  // occurrences of the last pair merged
};

template <class CjkSegmenter = KeepCjkRuns>
class BasicBpeTrainer {
 public:
  using Tokenizer = BasicBpeTokenizer<CjkSegmenter>;
  using Id = TokenId;

  explicit BasicBpeTrainer(BpeTrainerOptions opt, CjkSegmenter segmenter = {})
      : opt_(std::move(opt)), splitter_(make_splitter(opt_, std::move(segmenter))) {
    const std::size_t fixed = opt_.special_tokens.size() + 256 + opt_.terms.size();
    TESSERA_CHECK(opt_.vocab_size >= fixed, "BpeTrainer: vocab_size ", opt_.vocab_size,
                  " is smaller than the ", fixed, " tokens that are always present (",
                  opt_.special_tokens.size(), " special, 256 bytes, ", opt_.terms.size(),
                  " terms)");
  }

  // Counts the words of one text (a document; its pieces never span two texts).
  void add_text(std::string_view text) {
    stats_.bytes += text.size();
    splitter_.visit_pieces(text, [&](std::string_view w) { bump(counts_, w, 1); });
  }

  // Counts the words of many texts in parallel; same counts as add_text on each in turn.
  void add_texts(std::span<const std::string> texts) {
    std::vector<Counts> local;
#pragma omp parallel
    {
#pragma omp single
      local.resize(static_cast<std::size_t>(omp_threads()));
      Counts& mine = local[static_cast<std::size_t>(omp_thread())];
#pragma omp for schedule(dynamic, 16)
      for (std::int64_t i = 0; i < static_cast<std::int64_t>(texts.size()); ++i) {
        splitter_.visit_pieces(texts[static_cast<std::size_t>(i)],
                               [&](std::string_view w) { bump(mine, w, 1); });
      }
    }
    for (const auto& t : texts) stats_.bytes += t.size();
    for (auto& m : local) {
      for (auto& [w, c] : m) bump(counts_, w, c);
    }
  }

  // Streams a text file in blocks of lines (each line is one text, newline included), so a
  // file larger than memory can be counted.
  void add_file(const std::filesystem::path& path, std::size_t block_lines = 1 << 16) {
    std::ifstream in(path, std::ios::binary);
    TESSERA_CHECK(in, "BpeTrainer: cannot read ", path.string());
    std::vector<std::string> block;
    std::string line;
    while (std::getline(in, line)) {
      if (!in.eof()) line.push_back('\n');
      block.push_back(std::move(line));
      line.clear();
      if (block.size() == block_lines) {
        add_texts(block);
        block.clear();
      }
    }
    if (!block.empty()) add_texts(block);
  }

  const BpeTrainerStats& stats() const { return stats_; }

  // Runs the merges and returns the tokenizer. The trainer may be trained again (more text,
  // then train()) — the counts are kept.
  Tokenizer train() {
    // ---- ids: specials, bytes, then merges -------------------------------------------
    const Id n_special = static_cast<Id>(opt_.special_tokens.size());
    std::vector<std::string> bytes;  // id -> raw bytes, for the BPE part (from id n_special)
    std::unordered_map<std::string, Id> id_of;
    for (int b = 0; b < 256; ++b) {
      bytes.emplace_back(1, static_cast<char>(b));
      id_of.emplace(bytes.back(), n_special + static_cast<Id>(b));
    }
    auto bytes_of = [&](Id id) -> const std::string& { return bytes[id - n_special]; };

    // ---- words --------------------------------------------------------------------------
    struct Word {
      std::vector<Id> sym;
      std::uint64_t count;
    };
    std::vector<Word> words;
    words.reserve(counts_.size());
    {
      std::vector<std::pair<std::string_view, std::uint64_t>> sorted(counts_.begin(),
                                                                     counts_.end());
      std::sort(sorted.begin(), sorted.end());  // a fixed order: deterministic results
      for (const auto& [w, c] : sorted) {
        Word word{{}, c};
        for (unsigned char b : w) word.sym.push_back(n_special + b);
        words.push_back(std::move(word));
      }
    }
    stats_.distinct_words = words.size();

    // ---- pair counts and where each pair occurs ------------------------------------------
    auto key = [](Id a, Id b) { return (std::uint64_t{a} << 32) | b; };
    std::unordered_map<std::uint64_t, std::int64_t> pair_count;
    std::unordered_map<std::uint64_t, std::vector<std::uint32_t>> where;
    for (std::uint32_t wi = 0; wi < words.size(); ++wi) {
      const auto& w = words[wi];
      for (std::size_t k = 0; k + 1 < w.sym.size(); ++k) {
        const auto p = key(w.sym[k], w.sym[k + 1]);
        pair_count[p] += static_cast<std::int64_t>(w.count);
        auto& list = where[p];
        if (list.empty() || list.back() != wi) list.push_back(wi);
      }
    }
    struct Entry {
      std::int64_t count;
      std::uint64_t pair;
      bool operator<(const Entry& o) const {  // max count first, then the smaller pair
        return count != o.count ? count < o.count : pair > o.pair;
      }
    };
    std::priority_queue<Entry> heap;
    for (const auto& [p, c] : pair_count) heap.push({c, p});

    // ---- merge loop -----------------------------------------------------------------------
    std::vector<std::pair<Id, Id>> merges;
    const std::size_t target_bpe = opt_.vocab_size - opt_.special_tokens.size() - opt_.terms.size();
    std::vector<std::uint32_t> seen(words.size(), ~0u);
    std::unordered_map<std::uint64_t, std::int64_t> delta;
    while (bytes.size() < target_bpe && !heap.empty()) {
      const Entry top = heap.top();
      heap.pop();
      const auto it = pair_count.find(top.pair);
      const std::int64_t now = it == pair_count.end() ? 0 : it->second;
      if (now != top.count) {  // stale: re-queue with the current count
        if (now > 0) heap.push({now, top.pair});
        continue;
      }
      if (now < static_cast<std::int64_t>(opt_.min_pair_count) || now <= 0) break;
      const Id left = static_cast<Id>(top.pair >> 32),
               right = static_cast<Id>(top.pair & 0xFFFFFFFFu);
      std::string joined = bytes_of(left) + bytes_of(right);
      Id made;
      if (auto f = id_of.find(joined); f != id_of.end()) {
        made = f->second;  // another pair already made these bytes
      } else {
        made = n_special + static_cast<Id>(bytes.size());
        bytes.push_back(joined);
        id_of.emplace(std::move(joined), made);
      }
      merges.emplace_back(left, right);
      stats_.last_merge_count = static_cast<std::uint64_t>(now);
      const std::uint32_t stamp = static_cast<std::uint32_t>(merges.size());
      delta.clear();
      const std::vector<std::uint32_t> affected = std::move(where[top.pair]);
      where.erase(top.pair);
      for (std::uint32_t wi : affected) {
        if (seen[wi] == stamp) continue;
        seen[wi] = stamp;
        auto& w = words[wi];
        const auto c = static_cast<std::int64_t>(w.count);
        bool has = false;
        for (std::size_t k = 0; k + 1 < w.sym.size() && !has; ++k)
          has = w.sym[k] == left && w.sym[k + 1] == right;
        if (!has) continue;
        for (std::size_t k = 0; k + 1 < w.sym.size(); ++k) delta[key(w.sym[k], w.sym[k + 1])] -= c;
        std::vector<Id> merged;
        merged.reserve(w.sym.size());
        for (std::size_t k = 0; k < w.sym.size(); ++k) {
          if (k + 1 < w.sym.size() && w.sym[k] == left && w.sym[k + 1] == right) {
            merged.push_back(made);
            ++k;
          } else {
            merged.push_back(w.sym[k]);
          }
        }
        w.sym = std::move(merged);
        for (std::size_t k = 0; k + 1 < w.sym.size(); ++k) {
          const auto p = key(w.sym[k], w.sym[k + 1]);
          delta[p] += c;
          if (w.sym[k] == made || w.sym[k + 1] == made) {
            auto& list = where[p];
            if (list.empty() || list.back() != wi) list.push_back(wi);
          }
        }
      }
      for (const auto& [p, d] : delta) {
        if (d == 0) continue;
        auto& pc = pair_count[p];
        pc += d;
        if (d > 0) heap.push({pc, p});
        if (pc <= 0) pair_count.erase(p);
      }
    }
    stats_.merges = merges.size();

    // ---- assemble the tokenizer ----------------------------------------------------------
    const auto& alpha = ByteLevelAlphabet::get();
    std::vector<std::pair<std::string, Id>> vocab;
    // Special tokens are model vocabulary entries too (as in DeepSeek-V3's file): the reference
    // library keeps an added token's id only when the model knows its content, and otherwise
    // renumbers it after the vocabulary.
    for (Id i = 0; i < n_special; ++i) vocab.emplace_back(opt_.special_tokens[i], i);
    for (std::size_t i = 0; i < bytes.size(); ++i) {
      vocab.emplace_back(alpha.encode(bytes[i]), n_special + static_cast<Id>(i));
    }
    std::vector<std::pair<std::string, std::string>> merge_aliases;
    for (const auto& [l, r] : merges)
      merge_aliases.emplace_back(alpha.encode(bytes_of(l)), alpha.encode(bytes_of(r)));
    std::vector<AddedToken> added;
    for (Id i = 0; i < n_special; ++i)
      added.push_back({opt_.special_tokens[i], i, true, false, false, false});
    Id next = n_special + static_cast<Id>(bytes.size());
    for (const auto& t : opt_.terms) added.push_back({t, next++, false, false, false, false});
    return Tokenizer::from_parts(vocab, merge_aliases, std::move(added), opt_.pre_tokenizer,
                                 splitter_.segmenter());
  }

 private:
  using Counts =
      std::unordered_map<std::string, std::uint64_t, detail::StringHash, std::equal_to<>>;

  static void bump(Counts& m, std::string_view w, std::uint64_t c) {
    if (auto it = m.find(w); it != m.end()) {
      it->second += c;
    } else {
      m.emplace(std::string(w), c);
    }
  }

  static int omp_threads() { return omp_get_num_threads(); }
  static int omp_thread() { return omp_get_thread_num(); }

  // A tokenizer with only the byte alphabet, used to cut text exactly as encode() will.
  static Tokenizer make_splitter(const BpeTrainerOptions& opt, CjkSegmenter segmenter) {
    const auto& alpha = ByteLevelAlphabet::get();
    std::vector<std::pair<std::string, Id>> vocab;
    const Id n_special = static_cast<Id>(opt.special_tokens.size());
    for (int b = 0; b < 256; ++b) {
      std::string a;
      append_utf8(a, alpha.byte_to_char[b]);
      vocab.emplace_back(std::move(a), n_special + static_cast<Id>(b));
    }
    std::vector<AddedToken> added;
    Id next = n_special + 256;
    for (Id i = 0; i < n_special; ++i) {
      TESSERA_CHECK(!opt.special_tokens[i].empty(), "BpeTrainer: special token ", i, " is empty");
      added.push_back({opt.special_tokens[i], i, true, false, false, false});
    }
    for (const auto& t : opt.terms) {
      TESSERA_CHECK(!t.empty(), "BpeTrainer: a user term is empty");
      added.push_back({t, next++, false, false, false, false});
    }
    return Tokenizer::from_parts(vocab, {}, std::move(added), opt.pre_tokenizer,
                                 std::move(segmenter));
  }

  BpeTrainerOptions opt_;
  Tokenizer splitter_;
  Counts counts_;
  BpeTrainerStats stats_;
};

using BpeTrainer = BasicBpeTrainer<KeepCjkRuns>;

}  // namespace tessera::data
