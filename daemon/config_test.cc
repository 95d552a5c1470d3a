#include "daemon/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <set>
#include <string>

#include "absl/strings/str_cat.h"

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
  // As a file would hold it (bufferd --print-default-config): top-level
  // fields at the margin, nested ones indented by two.
  const std::string text = DefaultConfigText();
  EXPECT_THAT(text, ::testing::HasSubstr("\nheaps {\n  name: \"contiguous\"\n"));
  EXPECT_THAT(text, ::testing::Not(::testing::HasSubstr("\n   ")));
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
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\nlimits { max_fences_per_buffer: 200 }",
       "my.conf:2:10: field 'limits.max_fences_per_buffer' is 200; must be at most 128 (both "
       "sides of a buffer merge into one fence of at most 256)"},
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

constexpr uint64_t kGiB = uint64_t{1} << 30;

// A fake 24 GiB machine (MemTotal 23.4 GiB), without hugetlb pages, with
// CAP_IPC_LOCK, that has the groups "video" and "adm" and the user "bufferd".
MachineFacts FakeMachine() {
  MachineFacts machine;
  machine.mem_total = uint64_t{24530000} * 1024;  // 23.4 GiB
  machine.group_exists = [](const std::string& name) { return name == "video" || name == "adm"; };
  machine.user_exists = [](const std::string& name) { return name == "bufferd"; };
  return machine;
}

// Tests that every reservation and cap is checked against the machine, and
// every heap field against the heap type it is on, each error naming the
// place, the heap, the field and both figures.
TEST(ConfigTest, ReservationsAndFieldsAreCheckedAgainstTheMachine) {
  MachineFacts no_lock = FakeMachine();
  no_lock.cap_ipc_lock = false;
  no_lock.memlock_limit = 8 << 20;
  MachineFacts pool = FakeMachine();
  pool.available_hugepages_2m = 100;
  struct Case {
    std::string text;
    MachineFacts machine;
    std::string expected;
  } cases[] = {
      // 1 TiB meant as 1 GiB: refused before anything is prefaulted.
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\n\nheaps { name: \"c\" type: "
       "HEAP_TYPE_CARVEOUT "
       "capacity_bytes: 1099511627776 }",
       FakeMachine(),
       "my.conf:3:44: heaps[1] ('c'): field 'capacity_bytes' is 1 TiB (1099511627776 bytes); "
       "carveouts may reserve at most half of this machine's memory (MemTotal 23.4 GiB): 11.7 GiB"},
      // A pool too small for it: the carveout would fall back to base pages.
      {"heaps { name: \"c\" type: HEAP_TYPE_CARVEOUT capacity_bytes: 1099511627776 }", pool,
       "my.conf:1:44: heaps[0] ('c'): field 'capacity_bytes' is 1 TiB (1099511627776 bytes) (the "
       "2 MiB hugetlb pool has 100 pages available, not the 524288 it needs, so it reserves base "
       "pages); carveouts may reserve at most half of this machine's memory (MemTotal 23.4 GiB): "
       "11.7 GiB"},
      // Each fits, together they do not.
      {"heaps { name: \"a\" type: HEAP_TYPE_CARVEOUT capacity_bytes: 8589934592 }\n"
       "heaps {\n  name: \"b\"\n  type: HEAP_TYPE_CARVEOUT\n  capacity_bytes: 6442450944\n}",
       FakeMachine(),
       "my.conf:5:3: heaps[1] ('b'): field 'capacity_bytes' is 6 GiB (6442450944 bytes), which "
       "with the carveouts before it (8 GiB) makes 14 GiB; carveouts may reserve at most half of "
       "this machine's memory (MemTotal 23.4 GiB): 11.7 GiB"},
      // A cap above the machine's memory caps nothing.
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM capacity_bytes: 1099511627776 }", FakeMachine(),
       "my.conf:1:42: heaps[0] ('s'): field 'capacity_bytes' is 1 TiB (1099511627776 bytes); a "
       "heap's cap may be at most this machine's memory (MemTotal 23.4 GiB)"},
      {"heaps { name: \"g\" type: HEAP_TYPE_CONTIGUOUS capacity_bytes: 32212254720 }",
       FakeMachine(),
       "my.conf:1:46: heaps[0] ('g'): field 'capacity_bytes' is 30 GiB (32212254720 bytes); a "
       "heap's cap may be at most this machine's memory (MemTotal 23.4 GiB)"},
      // Caps and reservations together.
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM capacity_bytes: 21474836480 }\n"
       "heaps { name: \"c\" type: HEAP_TYPE_CARVEOUT capacity_bytes: 4294967296 }",
       FakeMachine(),
       "my.conf:2:44: heaps[1] ('c'): field 'capacity_bytes' is 4 GiB (4294967296 bytes), which "
       "with the heaps before it (20 GiB) makes 24 GiB; the heaps' capacities together may be at "
       "most this machine's memory (MemTotal 23.4 GiB)"},
      // require_mlock that RLIMIT_MEMLOCK cannot honour without CAP_IPC_LOCK.
      {"heaps { name: \"c\" type: HEAP_TYPE_CARVEOUT capacity_bytes: 67108864 require_mlock: true "
       "}",
       no_lock,
       "my.conf:1:69: heaps[0] ('c'): field 'require_mlock' is set, but the carveout's 64 MiB of "
       "base pages, with 0 B locked by the carveouts before it, exceed RLIMIT_MEMLOCK (8 MiB) and "
       "the daemon lacks CAP_IPC_LOCK; raise the limit (LimitMEMLOCK= in its unit, ulimit -l) or "
       "drop require_mlock"},
      {"heaps { name: \"a\" type: HEAP_TYPE_CARVEOUT capacity_bytes: 6291456 }\n"
       "heaps { name: \"b\" type: HEAP_TYPE_CARVEOUT capacity_bytes: 4194304 require_mlock: true }",
       no_lock,
       "my.conf:2:68: heaps[1] ('b'): field 'require_mlock' is set, but the carveout's 4 MiB of "
       "base pages, with 6 MiB locked by the carveouts before it, exceed RLIMIT_MEMLOCK (8 MiB) "
       "and "
       "the daemon lacks CAP_IPC_LOCK; raise the limit (LimitMEMLOCK= in its unit, ulimit -l) or "
       "drop require_mlock"},
      // Resource fields on heap types they do not apply to.
      {"heaps {\n  name: \"s\"\n  type: HEAP_TYPE_SYSTEM\n  hugepage_size: HUGEPAGE_SIZE_1G\n}",
       FakeMachine(),
       "my.conf:4:3: heaps[0] ('s'): field 'hugepage_size' applies to contiguous and carveout "
       "heaps only (a system heap has 4 KiB pages)"},
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM require_mlock: true }", FakeMachine(),
       "my.conf:1:42: heaps[0] ('s'): field 'require_mlock' applies to carveout heaps only "
       "(nothing else is locked)"},
      {"heaps { name: \"g\" type: HEAP_TYPE_CONTIGUOUS require_mlock: true }", FakeMachine(),
       "my.conf:1:46: heaps[0] ('g'): field 'require_mlock' applies to carveout heaps only "
       "(nothing else is locked)"},
      {"heaps { name: \"c\" type: HEAP_TYPE_CARVEOUT capacity_bytes: 4096 fallback: FALLBACK_THP }",
       FakeMachine(),
       "my.conf:1:65: heaps[0] ('c'): field 'fallback' applies to contiguous heaps only"},
      {"heaps { name: \"g\" type: HEAP_TYPE_CONTIGUOUS fallback: FALLBACK_THP fallback: "
       "FALLBACK_THP }",
       FakeMachine(), "my.conf:1:69: heaps[0] ('g'): field 'fallback' lists FALLBACK_THP twice"},
      {"heaps { name: \"g\" type: 7 }", FakeMachine(),
       "my.conf:1:19: heaps[0] ('g'): field 'type' is 7; must be HEAP_TYPE_SYSTEM, "
       "HEAP_TYPE_CONTIGUOUS or HEAP_TYPE_CARVEOUT"},
      // Names that must resolve on this machine.
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\ngroup: \"vidoe\"", FakeMachine(),
       "my.conf:2:1: field 'group' names group 'vidoe', which does not exist on this machine"},
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\ndebug_groups: \"adm\"\n  debug_groups: "
       "\"wheel\"",
       FakeMachine(),
       "my.conf:3:3: field 'debug_groups' names group 'wheel', which does not exist on this "
       "machine"},
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\nuser: \"bufferdd\"", FakeMachine(),
       "my.conf:2:1: field 'user' names user 'bufferdd', which does not exist on this machine"},
      // Misspellings get the closest name.
      {"heaps {\n  name: \"c\"\n  type: HEAP_TYPE_CARVEOUT\n  capcity_bytes: 4096\n}",
       FakeMachine(),
       "my.conf:4:16: Message type \"bufferd.v1.HeapConfig\" has no field named \"capcity_bytes\"; "
       "did you mean \"capacity_bytes\"?"},
      {"heaps { name: \"c\" type: HEAP_TYPE_CARVOUT }", FakeMachine(),
       "my.conf:1:43: Unknown enumeration value of \"HEAP_TYPE_CARVOUT\" for field \"type\"; did "
       "you mean \"HEAP_TYPE_CARVEOUT\"?"},
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\nquotas { max_bytes_per_sesion: 0 }",
       FakeMachine(),
       "my.conf:2:30: Message type \"bufferd.v1.QuotaConfig\" has no field named "
       "\"max_bytes_per_sesion\"; did you mean \"max_bytes_per_session\"?"},
      // Nothing close: no suggestion.
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\nfrobnicate: 1", FakeMachine(),
       "my.conf:2:11: Message type \"bufferd.v1.Config\" has no field named \"frobnicate\"."},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.text);
    absl::StatusOr<v1::Config> config = ParseConfig(c.text, "my.conf", c.machine);
    ASSERT_FALSE(config.ok());
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(std::string(config.status().message()), c.expected);
  }
}

// Tests what the machine checks let through: carveouts up to half of MemTotal
// in base pages, a carveout the hugetlb pool holds (its pages are set aside
// already, so it is bounded by the pool, not by the share), the groups and
// user the machine has, require_mlock within RLIMIT_MEMLOCK, and any config
// on a machine whose MemTotal is unknown.
TEST(ConfigTest, ReservationsTheMachineCanHoldAreAccepted) {
  MachineFacts big_pool = FakeMachine();
  big_pool.available_hugepages_2m = 8192;  // 16 GiB
  MachineFacts no_lock = FakeMachine();
  no_lock.cap_ipc_lock = false;
  no_lock.memlock_limit = 8 << 20;
  MachineFacts unknown;  // MemTotal 0: nothing to check against
  const struct {
    std::string text;
    MachineFacts machine;
  } cases[] = {
      {"heaps { name: \"a\" type: HEAP_TYPE_CARVEOUT capacity_bytes: 6442450944 }\n"
       "heaps { name: \"b\" type: HEAP_TYPE_CARVEOUT capacity_bytes: 5368709120 }\n"
       "heaps { name: \"s\" type: HEAP_TYPE_SYSTEM capacity_bytes: 8589934592 }",
       FakeMachine()},
      {"heaps { name: \"c\" type: HEAP_TYPE_CARVEOUT capacity_bytes: 15032385536 }", big_pool},
      {"heaps { name: \"c\" type: HEAP_TYPE_CARVEOUT capacity_bytes: 8388608 require_mlock: true }",
       no_lock},
      {"heaps { name: \"c\" type: HEAP_TYPE_CARVEOUT capacity_bytes: 1099511627776 }\n"
       "group: \"video\" debug_groups: \"adm\" user: \"bufferd\"",
       unknown},
      {"heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\ngroup: \"video\"\ndebug_groups: \"adm\"\n"
       "user: \"bufferd\"",
       FakeMachine()},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.text);
    absl::StatusOr<v1::Config> config = ParseConfig(c.text, "my.conf", c.machine);
    EXPECT_TRUE(config.ok()) << config.status();
  }
}

// Tests that omitting `quotas` (or a field of it, or `limits`) means the
// embedded default, never "unlimited", and that a written 0 is 0 (unlimited).
TEST(ConfigTest, OmittedQuotasAreTheDefaultAndZeroIsUnlimited) {
  const v1::Config defaults = DefaultConfig();
  ASSERT_EQ(defaults.quotas().max_allocation_bytes(), 1 * kGiB);
  {
    SCOPED_TRACE("no quotas block");
    auto config =
        ParseConfig("heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }", "my.conf", FakeMachine());
    ASSERT_TRUE(config.ok()) << config.status();
    EXPECT_EQ(config->quotas().max_bytes_per_session(), 4 * kGiB);
    EXPECT_EQ(config->quotas().max_bytes_per_uid(), 8 * kGiB);
    EXPECT_EQ(config->quotas().max_buffers_per_session(), 4096u);
    EXPECT_EQ(config->quotas().max_fences_per_session(), 4096u);
    EXPECT_EQ(config->quotas().max_allocation_bytes(), 1 * kGiB);
    EXPECT_EQ(config->limits().max_sessions(), 4096u);
    EXPECT_EQ(config->limits().max_frame_dimension(), 16384u);
    EXPECT_EQ(config->limits().max_fds_per_uid(), 0u) << "its default is half the fd budget";
    EXPECT_EQ(config->usages_size(), 0) << "the default's usages name heaps this config lacks";
  }
  {
    SCOPED_TRACE("some fields written, some zero");
    auto config = ParseConfig(
        "heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\n"
        "quotas { max_bytes_per_session: 0 max_buffers_per_session: 7 }\n"
        "limits { max_sessions: 9 }",
        "my.conf", FakeMachine());
    ASSERT_TRUE(config.ok()) << config.status();
    EXPECT_EQ(config->quotas().max_bytes_per_session(), 0u) << "written 0: unlimited";
    EXPECT_EQ(config->quotas().max_buffers_per_session(), 7u);
    EXPECT_EQ(config->quotas().max_bytes_per_uid(), 8 * kGiB);
    EXPECT_EQ(config->quotas().max_fences_per_session(), 4096u);
    EXPECT_EQ(config->quotas().max_allocation_bytes(), 1 * kGiB);
    EXPECT_EQ(config->limits().max_sessions(), 9u);
    EXPECT_EQ(config->limits().max_sessions_per_uid(), 1024u);
  }
  {
    SCOPED_TRACE("every quota written 0");
    auto config = ParseConfig(
        "heaps { name: \"s\" type: HEAP_TYPE_SYSTEM }\n"
        "quotas { max_bytes_per_session: 0 max_bytes_per_uid: 0 max_buffers_per_session: 0\n"
        "         max_fences_per_session: 0 max_allocation_bytes: 0 }",
        "my.conf", FakeMachine());
    ASSERT_TRUE(config.ok()) << config.status();
    EXPECT_EQ(config->quotas().ByteSizeLong(), 0u) << config->quotas().ShortDebugString();
  }
}

// Tests that a directory given as the config file is named as one, not
// read as an empty config ("no heaps").
TEST(ConfigTest, DirectoryIsNotAConfigFile) {
  const std::string dir = ::testing::TempDir();
  absl::StatusOr<v1::Config> config = LoadConfigFile(dir, FakeMachine());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(config.status().message(),
            absl::StrCat("config file ", dir, " is a directory; --config takes a textproto file"));
}

// Tests that a file is read whole and checked against the machine it is
// given, with its path in the message.
TEST(ConfigTest, FileIsCheckedAgainstTheMachine) {
  const std::string path = absl::StrCat(::testing::TempDir(), "/big.conf");
  std::ofstream(path) << "heaps {\n  name: \"c\"\n  type: HEAP_TYPE_CARVEOUT\n"
                         "  capacity_bytes: 1099511627776\n}\n";
  absl::StatusOr<v1::Config> config = LoadConfigFile(path, FakeMachine());
  EXPECT_EQ(config.status().message(),
            absl::StrCat(path,
                         ":4:3: heaps[0] ('c'): field 'capacity_bytes' is 1 TiB (1099511627776 "
                         "bytes); carveouts may reserve at most half of this machine's memory "
                         "(MemTotal 23.4 GiB): 11.7 GiB"));
  std::remove(path.c_str());
}

// Tests that this host's facts are read: its memory, and its root group.
TEST(ConfigTest, ReadsThisMachine) {
  const MachineFacts machine = ReadMachineFacts();
  EXPECT_GT(machine.mem_total, 64u << 20);
  ASSERT_TRUE(machine.group_exists);
  EXPECT_TRUE(machine.group_exists("root"));
  EXPECT_FALSE(machine.group_exists("no-such-group-bufferd"));
  ASSERT_TRUE(machine.user_exists);
  EXPECT_TRUE(machine.user_exists("root"));
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
