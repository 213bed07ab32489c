// tessera/data/tokenizer_chinese.hpp — how runs of Chinese characters are cut before BPE.
//
// Why a type parameter: byte-level BPE learns whatever units the pre-tokeniser hands it. A
// tokenizer that mirrors a published model (DeepSeek-V3, GPT-2) must keep that model's pieces
// exactly (KeepCjkRuns, the default). A tokenizer trained for Chinese-heavy text may instead
// cut Chinese runs into characters (SplitCjkCharacters) or into dictionary words
// (JiebaSegmenter: maximum-probability segmentation over jieba's word-frequency dictionary),
// so merges never cross a word boundary. The policy only adds cut points inside runs of CJK
// ideographs; every other byte stays in the piece the pre-tokeniser made.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/data/tokenizer_unicode.hpp"

namespace tessera::data {

// Leaves pieces as the pre-tokeniser made them (what Hugging Face's library does).
struct KeepCjkRuns {
  static constexpr bool kCuts = false;
  static constexpr const char* kName = "keep";
  void cuts(std::string_view, std::vector<std::size_t>&) const {}
};

namespace detail {
// Calls f(begin, end, chars) for each maximal run of CJK ideographs in piece; chars holds the
// byte offset of each character of the run plus the run's end.
template <class F>
void for_each_cjk_run(std::string_view piece, F&& f) {
  std::vector<std::size_t> starts;
  std::size_t i = 0;
  while (i < piece.size()) {
    const Utf8Char c = utf8_at(piece, i);
    if (is_cjk_ideograph(c.cp)) {
      starts.clear();
      std::size_t j = i;
      while (j < piece.size()) {
        const Utf8Char d = utf8_at(piece, j);
        if (!is_cjk_ideograph(d.cp)) break;
        starts.push_back(j);
        j += d.len;
      }
      starts.push_back(j);
      f(starts);
      i = j;
    } else {
      i += c.len;
    }
  }
}
}  // namespace detail

// Every CJK ideograph becomes its own piece (any text attached before the run, such as
// GPT-2's leading space, stays with the first character).
struct SplitCjkCharacters {
  static constexpr bool kCuts = true;
  static constexpr const char* kName = "char";
  void cuts(std::string_view piece, std::vector<std::size_t>& out) const {
    detail::for_each_cjk_run(piece, [&](const std::vector<std::size_t>& s) {
      for (std::size_t k = 1; k + 1 < s.size(); ++k) out.push_back(s[k]);
    });
  }
};

// Maximum-probability segmentation (jieba's algorithm without its HMM for unknown words):
// among all ways to cut a run into dictionary words, pick the one maximising the product of
// word frequencies / total; characters missing from the dictionary count as frequency 1.
class JiebaSegmenter {
 public:
  static constexpr bool kCuts = true;
  static constexpr const char* kName = "jieba";

  JiebaSegmenter() = default;  // empty dictionary: every character is its own word
  explicit JiebaSegmenter(const std::filesystem::path& dict_txt) { load(dict_txt); }

  // Debian's python3-jieba installs the dictionary here.
  static std::filesystem::path default_dictionary_path() {
    for (const char* p :
         {"/usr/lib/python3/dist-packages/jieba/dict.txt", "/usr/share/python3-jieba/dict.txt"}) {
      if (std::filesystem::exists(p)) return p;
    }
    return {};
  }

  // dict.txt lines: "word frequency [part-of-speech]".
  void load(const std::filesystem::path& dict_txt) {
    std::ifstream in(dict_txt);
    TESSERA_CHECK(in, "JiebaSegmenter: cannot read dictionary ", dict_txt.string());
    std::string line;
    std::size_t line_no = 0;
    while (std::getline(in, line)) {
      ++line_no;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty()) continue;
      const auto sp = line.find(' ');
      TESSERA_CHECK(sp != std::string::npos && sp > 0, "JiebaSegmenter: ", dict_txt.string(), ":",
                    line_no, ": expected \"word frequency\", got \"", line, "\"");
      const std::string word = line.substr(0, sp);
      const double freq = std::strtod(line.c_str() + sp + 1, nullptr);
      add_word(word, freq);
    }
    TESSERA_CHECK(total_ > 0, "JiebaSegmenter: dictionary ", dict_txt.string(), " has no words");
  }

  void add_word(const std::string& word, double freq) {
    freq_[word] += freq;
    total_ += freq;
    // Every prefix must be known so the word graph can be walked (jieba does the same).
    std::size_t i = 0;
    while (i < word.size()) {
      i += utf8_at(word, i).len;
      if (i < word.size()) freq_.try_emplace(word.substr(0, i), 0.0);
    }
    std::size_t chars = 0;
    for (std::size_t k = 0; k < word.size(); k += utf8_at(word, k).len) ++chars;
    if (chars > max_chars_) max_chars_ = chars;
  }

  std::size_t size() const { return freq_.size(); }

  // Byte offsets (into run) where words begin, after the first; used by cuts() and tests.
  std::vector<std::string_view> segment(std::string_view run) const {
    std::vector<std::size_t> starts;
    for (std::size_t i = 0; i < run.size(); i += utf8_at(run, i).len) starts.push_back(i);
    starts.push_back(run.size());
    std::vector<std::size_t> ends = best_route(run, starts);
    std::vector<std::string_view> words;
    for (std::size_t k = 0; k + 1 < starts.size();) {
      words.push_back(run.substr(starts[k], starts[ends[k]] - starts[k]));
      k = ends[k];
    }
    return words;
  }

  void cuts(std::string_view piece, std::vector<std::size_t>& out) const {
    detail::for_each_cjk_run(piece, [&](const std::vector<std::size_t>& s) {
      const std::size_t base = s.front();
      std::vector<std::size_t> rel(s.size());
      for (std::size_t k = 0; k < s.size(); ++k) rel[k] = s[k] - base;
      const std::string_view run = piece.substr(base, s.back() - base);
      const std::vector<std::size_t> ends = best_route(run, rel);
      for (std::size_t k = ends[0]; k + 1 < s.size(); k = ends[k]) out.push_back(s[k]);
    });
  }

 private:
  // For each char index k, the char index just past the best word starting at k. jieba walks
  // right to left and keeps max((log-prob, end)), so ties go to the longer word.
  std::vector<std::size_t> best_route(std::string_view run,
                                      const std::vector<std::size_t>& starts) const {
    const std::size_t n = starts.size() - 1;
    const double log_total = std::log(total_ > 0 ? total_ : 1.0);
    std::vector<double> score(n + 1, 0.0);
    std::vector<std::size_t> end(n + 1, n);
    for (std::size_t k = n; k-- > 0;) {
      double best = -1e300;
      std::size_t best_end = k + 1;
      bool any = false;
      for (std::size_t j = k + 1; j <= n && j - k <= max_chars_; ++j) {
        const auto it = freq_.find(std::string(run.substr(starts[k], starts[j] - starts[k])));
        if (it == freq_.end()) break;  // no longer a prefix of any word
        if (it->second <= 0) continue;
        const double s = std::log(it->second) - log_total + score[j];
        if (!any || s >= best) best = s, best_end = j, any = true;
      }
      if (!any) best = std::log(1.0) - log_total + score[k + 1], best_end = k + 1;
      score[k] = best;
      end[k] = best_end;
    }
    return end;
  }

  std::unordered_map<std::string, double> freq_;
  double total_ = 0;
  std::size_t max_chars_ = 1;
};

}  // namespace tessera::data
