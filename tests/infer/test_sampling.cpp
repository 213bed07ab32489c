// tests/infer/test_sampling.cpp — the samplers of infer/generate.hpp against closed forms:
// greedy is the arg max, each cut keeps exactly the tokens its definition keeps, the draw
// frequencies follow softmax(z / T) over the kept tokens (a chi-square bound), the penalty
// rescales exactly the seen tokens, and a seed fixes the sequence.
#define BOOST_TEST_MODULE sampling
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <map>
#include <set>
#include <vector>

#include "tessera/infer/generate.hpp"

namespace ti = tessera::infer;

namespace {

const std::vector<float> kLogits = {1.0f, 3.0f, -2.0f, 3.0f, 0.5f, 2.0f, -1.0f};

// Draws n tokens with a fresh sampler per draw sequence; returns the counts.
std::map<int32_t, int> draw(const ti::SamplingOptions& o, int n) {
  ti::Sampler s(o);
  std::map<int32_t, int> c;
  for (int i = 0; i < n; ++i) ++c[s.sample(kLogits, {})];
  return c;
}

// Chi-square statistic of counts against probabilities p over the kept ids.
double chi2(const std::map<int32_t, int>& c, const std::map<int32_t, double>& p, int n) {
  double x = 0;
  for (const auto& [id, pi] : p) {
    const double e = pi * n;
    const double o = c.count(id) ? c.at(id) : 0;
    x += (o - e) * (o - e) / e;
  }
  return x;
}

std::map<int32_t, double> softmax_over(const std::vector<int32_t>& ids, double t) {
  std::map<int32_t, double> p;
  double s = 0;
  for (int32_t i : ids) s += std::exp(kLogits[i] / t);
  for (int32_t i : ids) p[i] = std::exp(kLogits[i] / t) / s;
  return p;
}

}  // namespace

BOOST_AUTO_TEST_CASE(greedy_is_argmax_with_ties_to_lowest_id) {
  ti::Sampler s;
  BOOST_TEST(s.sample(kLogits, {}) == 1);  // 3.0 at ids 1 and 3
  ti::SamplingOptions k1;
  k1.temperature = 1.0f;
  k1.top_k = 1;
  ti::Sampler s1(k1);
  for (int i = 0; i < 20; ++i) BOOST_TEST(s1.sample(kLogits, {}) == 1);
}

BOOST_AUTO_TEST_CASE(temperature_draws_follow_softmax) {
  ti::SamplingOptions o;
  o.temperature = 0.7f;
  o.seed = 123;
  const int n = 40000;
  const auto c = draw(o, n);
  const auto p = softmax_over({0, 1, 2, 3, 4, 5, 6}, 0.7);
  const double x = chi2(c, p, n);
  BOOST_TEST_MESSAGE("chi2 = " << x);
  BOOST_TEST(x < 22.5);  // 6 degrees of freedom: P(chi2 > 22.5) ~ 0.001
}

BOOST_AUTO_TEST_CASE(top_k_keeps_the_k_largest) {
  ti::SamplingOptions o;
  o.temperature = 1.0f;
  o.top_k = 3;
  o.seed = 5;
  const int n = 30000;
  const auto c = draw(o, n);
  for (const auto& [id, k] : c) BOOST_TEST((id == 1 || id == 3 || id == 5));
  BOOST_TEST(chi2(c, softmax_over({1, 3, 5}, 1.0), n) < 13.8);  // 2 dof, p ~ 0.001
}

BOOST_AUTO_TEST_CASE(top_p_keeps_the_smallest_prefix_reaching_p) {
  // Sorted probabilities at T = 1: ids 1, 3 (0.383 each), 5 (0.141), 0 (0.052), ...; with
  // p = 0.8 the prefix {1, 3} has 0.766 < 0.8, so {1, 3, 5} is kept.
  const auto all = softmax_over({0, 1, 2, 3, 4, 5, 6}, 1.0);
  BOOST_REQUIRE(all.at(1) + all.at(3) < 0.8 && all.at(1) + all.at(3) + all.at(5) >= 0.8);
  ti::SamplingOptions o;
  o.temperature = 1.0f;
  o.top_p = 0.8f;
  o.seed = 9;
  const int n = 30000;
  const auto c = draw(o, n);
  std::set<int32_t> seen;
  for (const auto& [id, k] : c) seen.insert(id);
  BOOST_TEST((seen == std::set<int32_t>{1, 3, 5}));
  BOOST_TEST(chi2(c, softmax_over({1, 3, 5}, 1.0), n) < 13.8);
}

BOOST_AUTO_TEST_CASE(repetition_penalty_rescales_seen_tokens) {
  // Penalty 2 on ids 1 and 2: logit 3 -> 1.5, -2 -> -4; greedy then picks id 3 (3.0).
  ti::SamplingOptions o;
  o.repetition_penalty = 2.0f;
  ti::Sampler s(o);
  const std::vector<int32_t> history = {1, 2, 1};
  BOOST_TEST(s.sample(kLogits, history) == 3);
  // And 1, 3 both seen: 1.5 and 1.5; id 5 (2.0) wins.
  const std::vector<int32_t> h2 = {1, 3};
  BOOST_TEST(s.sample(kLogits, h2) == 5);
}

BOOST_AUTO_TEST_CASE(a_seed_fixes_the_sequence) {
  ti::SamplingOptions o;
  o.temperature = 1.5f;
  o.seed = 42;
  ti::Sampler a(o), b(o);
  std::vector<int32_t> x, y;
  for (int i = 0; i < 200; ++i) x.push_back(a.sample(kLogits, {}));
  for (int i = 0; i < 200; ++i) y.push_back(b.sample(kLogits, {}));
  BOOST_TEST(x == y, boost::test_tools::per_element());
  o.seed = 43;
  ti::Sampler c(o);
  std::vector<int32_t> z;
  for (int i = 0; i < 200; ++i) z.push_back(c.sample(kLogits, {}));
  BOOST_TEST(x != z);
}

BOOST_AUTO_TEST_CASE(bad_options_are_refused) {
  ti::SamplingOptions o;
  o.top_p = 0.0f;
  BOOST_CHECK_THROW(ti::Sampler{o}, tessera::Error);
  o = {};
  o.temperature = -1.0f;
  BOOST_CHECK_THROW(ti::Sampler{o}, tessera::Error);
  o = {};
  o.repetition_penalty = 0.0f;
  BOOST_CHECK_THROW(ti::Sampler{o}, tessera::Error);
}

BOOST_AUTO_TEST_CASE(chatml_rendering) {
  const std::string tmpl =
      "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nDefault "
      "sys<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
      "message['content'] + '<|im_end|>' + '\n'}}";
  const std::vector<ti::ChatMessage> m = {{"user", "hi"}};
  BOOST_TEST(ti::render_chat(m, tmpl) ==
             "<|im_start|>system\nDefault sys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
             "<|im_start|>assistant\n");
  const std::vector<ti::ChatMessage> m2 = {{"system", "S"}, {"user", "u"}};
  BOOST_TEST(ti::render_chat(m2, tmpl, false) ==
             "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu<|im_end|>\n");
  BOOST_CHECK_THROW(ti::render_chat(m, "{{ bos_token }}[INST]"), tessera::Error);
}

BOOST_AUTO_TEST_CASE(stop_strings_span_tokens) {
  ti::StopStrings stop({"\n\n", "User:"});
  BOOST_TEST(!stop.push("Hel"));
  BOOST_TEST(!stop.push("lo\n"));
  BOOST_TEST(stop.push("\nWorld"));  // "\n\n" across two pieces
  BOOST_TEST(stop.text() == "Hello");
  BOOST_TEST(stop.push("more"));  // stays stopped
  ti::StopStrings s2({"User:"});
  BOOST_TEST(!s2.push("ok Us"));
  BOOST_TEST(!s2.push("e"));
  BOOST_TEST(s2.push("r: hi"));
  BOOST_TEST(s2.text() == "ok ");
  // The earliest of two matches ending in the same piece wins.
  ti::StopStrings s3({"cd", "b"});
  BOOST_TEST(s3.push("abcd"));
  BOOST_TEST(s3.text() == "a");
  BOOST_CHECK_THROW(ti::StopStrings({""}), tessera::Error);
}
