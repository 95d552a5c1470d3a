#include "daemon/config.h"

#include <gtest/gtest.h>

#include <fstream>

namespace bufferd {
namespace {

// Tests that the embedded default parses, validates and has the documented
// heaps.
TEST(ConfigTest, EmbeddedDefaultIsValid) {
  absl::StatusOr<v1::Config> config = ParseConfig(DefaultConfigText(), "default");
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_EQ(config->heaps_size(), 3);
  EXPECT_EQ(config->heaps(0).name(), "system");
  EXPECT_EQ(config->heaps(1).type(), v1::HEAP_TYPE_CONTIGUOUS);
  EXPECT_EQ(config->heaps(2).capacity_bytes(), 64u << 20);
  EXPECT_GT(config->quotas().max_allocation_bytes(), 0u);
}

// Tests that every error names the file, line and column: syntax errors where
// the parser stopped, semantic ones at the bad field (or, for a missing
// field, at its heap), with the heap and field by name.
TEST(ConfigTest, ErrorsNameLineAndField) {
  struct Case {
    std::string text;
    std::string expected;
  } cases[] = {
      {"heaps {\n  name: \"a\"\n  typo: 3\n}\n",
       "my.conf:3:7: Message type \"bufferd.v1.HeapConfig\" has no field named \"typo\""},
      {"heaps {\n  name: \"a\"\n  type: HEAP_TYPE_NOPE }\n",
       "my.conf:3:24: Unknown enumeration value of \"HEAP_TYPE_NOPE\" for field \"type\""},
      {"", "my.conf: config defines no heaps"},
      {"heaps { name: \"Bad Name\" type: HEAP_TYPE_SYSTEM }",
       "my.conf:1:9: heaps[0] ('Bad Name'): field 'name' must match [a-z0-9_-]{1,32}"},
      {"heaps { name: \"a\" type: HEAP_TYPE_SYSTEM }\nheaps { name: \"a\" type: HEAP_TYPE_SYSTEM }",
       "my.conf:2:9: heaps[1] ('a'): field 'name' is used twice"},
      // A missing field: the heap's own line.
      {"heaps { name: \"x\" type: HEAP_TYPE_SYSTEM }\n\n  heaps { name: \"a\" }",
       "my.conf:3:3: heaps[1] ('a'): field 'type' is required"},
      {"heaps {\n  name: \"c\"\n  type: HEAP_TYPE_CARVEOUT\n}",
       "my.conf:1:1: heaps[0] ('c'): field 'capacity_bytes' is required for a carveout heap"},
      {"heaps {\n  name: \"s\"\n  type: HEAP_TYPE_SYSTEM\n  fallback: FALLBACK_THP\n}",
       "my.conf:4:3: heaps[0] ('s'): field 'fallback' applies to contiguous heaps only"},
      {"heaps {\n  name: \"g\"\n  type: HEAP_TYPE_CONTIGUOUS\n  fallback: FALLBACK_THP\n"
       "  fallback: FALLBACK_UNSPECIFIED\n}",
       "my.conf:5:3: heaps[0] ('g'): field 'fallback' must be FALLBACK_THP or FALLBACK_BASE_PAGES"},
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\nlog_level: \"loud\"",
       "my.conf:2:1: field 'log_level' is 'loud'"},
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\nfd_budget: 3",
       "my.conf:2:1: field 'fd_budget' is 3; must be at least 16 (or 0 for the default)"},
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\nlimits {\n  max_sessions: 5\n"
       "  max_fds_per_uid: 1\n}",
       "my.conf:4:3: field 'limits.max_fds_per_uid' is 1; must be at least 4"},
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\nusages {\n  name: \"cam\"\n"
       "  heaps: \"s\"\n  heaps: \"nope\"\n}",
       "my.conf:5:3: usages[0] ('cam'): field 'heaps' names heap 'nope', which the config does "
       "not define"},
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\nusages { name: \"cam\" heaps: \"s\" }\n"
       "usages {\n  name: \"cam\"\n  heaps: \"s\"\n}",
       "my.conf:4:3: usages[1] ('cam'): field 'name' is used twice"},
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\nusages { name: \"cam\" }",
       "my.conf:2:1: usages[0] ('cam'): field 'heaps' must name at least one heap"},
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\nusages { name: \"c\" heaps: [\"s\", \"s\"] }",
       "usages[0] ('c'): field 'heaps' lists heap 's' twice"},
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\nusages { name: \"Cam!\" heaps: \"s\" }",
       "my.conf:2:10: usages[0] ('Cam!'): field 'name' must match [a-z0-9_-]{1,32}"},
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\nlimits { max_buffers_per_call: 5000 }",
       "my.conf:2:10: field 'limits.max_buffers_per_call' is 5000; must be at most 1024"},
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\nlimits { max_frame_dimension: 70000 }",
       "field 'limits.max_frame_dimension' is 70000; must be at most 65536"},
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\nlimits { max_session: 5 }",
       "my.conf:2:21: Message type \"bufferd.v1.LimitsConfig\" has no field named "
       "\"max_session\""},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.text);
    absl::StatusOr<v1::Config> config = ParseConfig(c.text, "my.conf");
    ASSERT_FALSE(config.ok());
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(config.status().message().find(c.expected), absl::string_view::npos)
        << config.status();
  }
}

// Tests that a missing file is reported with its path.
TEST(ConfigTest, MissingFile) {
  absl::StatusOr<v1::Config> config = LoadConfigFile("/nonexistent/bufferd.conf");
  EXPECT_EQ(config.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(config.status().message().find("/nonexistent/bufferd.conf"), absl::string_view::npos);
}

// Tests that BuildHeaps creates every configured heap with its options, and
// several named carveouts side by side.
TEST(ConfigTest, BuildsNamedHeaps) {
  absl::StatusOr<v1::Config> config =
      ParseConfig(R"pb(
                    heaps { name: "system" type: HEAP_TYPE_SYSTEM capacity_bytes: 1048576 }
                    heaps {
                      name: "display"
                      type: HEAP_TYPE_CARVEOUT
                      capacity_bytes: 4194304
                      hugepage_size: HUGEPAGE_SIZE_2M
                    }
                    heaps { name: "camera" type: HEAP_TYPE_CARVEOUT capacity_bytes: 2097152 }
                    heaps { name: "gpu" type: HEAP_TYPE_CONTIGUOUS fallback: FALLBACK_BASE_PAGES }
                  )pb",
                  "inline");
  ASSERT_TRUE(config.ok()) << config.status();
  absl::StatusOr<std::unique_ptr<HeapRegistry>> heaps = BuildHeaps(*config);
  ASSERT_TRUE(heaps.ok()) << heaps.status();
  ASSERT_EQ((*heaps)->heaps().size(), 4u);
  EXPECT_EQ((*heaps)->Find("system")->Stats().capacity, 1u << 20);
  EXPECT_EQ((*heaps)->Find("display")->kind(), HeapKind::kCarveout);
  EXPECT_EQ((*heaps)->Find("display")->Stats().capacity, 4u << 20);
  EXPECT_EQ((*heaps)->Find("camera")->Stats().capacity, 2u << 20);
  auto buffer = (*heaps)->Find("gpu")->Allocate(1, "x");
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  // 2 MiB from the hugetlb pool, else one base page from the fallback.
  EXPECT_EQ((*buffer)->size(), (*buffer)->backing() == Backing::kHugetlb2M ? 2u << 20 : 4096u);
}

}  // namespace
}  // namespace bufferd
