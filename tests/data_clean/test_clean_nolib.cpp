// The cleaning headers built *without* tessera::text (no RE2, utf8proc, xxHash, OpenCC):
// they compile, the stages that need a missing library throw tessera::Error naming the
// package when constructed, and the stages that need none work.
#define BOOST_TEST_MODULE data_clean_nolib
#include <boost/test/unit_test.hpp>

#include "tessera/data/clean/pipeline.hpp"

using namespace tessera::data::clean;

namespace {
auto says(const char* part) {
  return [part](const tessera::Error& e) {
    return std::string(e.what()).find(part) != std::string::npos;
  };
}
}  // namespace

BOOST_AUTO_TEST_CASE(missing_libraries_are_reported_at_construction) {
  StageConfig c;
  BOOST_CHECK_EXCEPTION(make_stage("normalize", c), tessera::Error, says("libutf8proc-dev"));
  BOOST_CHECK_EXCEPTION(make_stage("filter", c), tessera::Error, says("libre2-dev"));
  BOOST_CHECK_EXCEPTION(make_stage("exact-dedup", c), tessera::Error, says("libxxhash-dev"));
  BOOST_CHECK_EXCEPTION(make_stage("near-dedup", c), tessera::Error, says("libxxhash-dev"));
  c.normalize.nfkc = false;
  c.normalize.traditional_to_simplified = true;
  BOOST_CHECK_EXCEPTION(make_stage("normalize", c), tessera::Error, says("libopencc-dev"));
}

BOOST_AUTO_TEST_CASE(stages_without_dependencies_work) {
  NormalizeOptions o;
  o.nfkc = false;
  Normalizer n(o);
  BOOST_TEST(n.normalize("\x1b[33mhello\x1b[0m   world\x07") == "hello world");
  QualityFilter q;
  Document d{
      "The committee met on Tuesday to discuss the budget for the coming year and the plan."};
  BOOST_TEST(q.process(d));
  BOOST_TEST(make_stage("lda", {})->needs_corpus());
}
