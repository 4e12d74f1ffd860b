// crisp_et_runner: run a crisp-edge ExecuTorch bundle on device, with task switching, trusting no file
// it has not checked.
//
//   crisp_et_runner BUNDLE_DIR OUT_DIR --inputs IN_DIR --cases N [--task NAME[=PATH.ptd] ...]
//                   [--manifest-sha256 HEX]
//   crisp_et_runner LM_BUNDLE_DIR OUT_DIR --generate ID,ID,... --max-new-tokens N [--task ...] [--manifest-sha256 HEX]
//                   (a language-model bundle: greedy token ids per task, to stdout and OUT_DIR/tokens.TASK.txt)
//   crisp_et_runner --sha256 FILE            (tools for tests and integrators; see README.md)
//   crisp_et_runner --ptd-digest FILE.ptd
//   crisp_et_runner --io-spec BUNDLE_DIR
//
// Trust chain: BUNDLE_DIR/manifest.json is read with a strict bounded JSON parser (optionally pinned by
// --manifest-sha256). Every file the runner then reads is checked against it before use: model.pte and
// default.ptd by size and SHA-256 (read once into memory, so the bytes checked are the bytes used);
// the program's methods, input/output shapes and dtypes, crisp_tag and crisp_io constants against the
// manifest; task files of the bundle by their manifest SHA-256; task files by path (outside the bundle)
// by their own crisp.digest and crisp.tag. Inputs are strict .npy files of exactly the manifest shape.
// Non-regular files (FIFOs, devices, directories) and oversized files are refused before a byte is read.
//
// The work runs in a forked child; a signal there (ExecuTorch crashing on a malformed program) is exit 4.
// Exit codes: 0 ok; 1 internal error (out of memory, an unexpected exception); 2 bad command line,
// input .npy files or output folder; 3 a task file refused; 4 a program that fails to load or run;
// 5 a bundle that fails verification (manifest malformed or pinned hash differs, a file that does not
// match its record, a program that does not match its manifest).
#include <executorch/extension/data_loader/buffer_data_loader.h>
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <new>
#include <set>
#include <string>
#include <vector>

#include "ptd_reader.h"
#include "sha256.h"
#include "strict_json.h"

using executorch::aten::ScalarType;
using executorch::extension::BufferDataLoader;
using executorch::extension::make_tensor_ptr;
using executorch::extension::TensorPtr;
using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::Program;

namespace {

enum Exit { kOk = 0, kInternal = 1, kUsage = 2, kTask = 3, kProgram = 4, kBundle = 5 };

struct Fail {
  int code;
  std::string msg;
};

constexpr uint64_t kMaxManifest = 16ull << 20;   // a manifest is kilobytes
constexpr uint64_t kMaxProgram = 4ull << 30;     // model.pte
constexpr uint64_t kMaxPtd = 1ull << 30;         // a task file (as MAX_PTD_BYTES in Python)
constexpr uint64_t kMaxTensorBytes = 1ull << 30; // one input or output tensor
constexpr int kMaxCases = 1 << 16;
constexpr const char* kFormat = "crisp-edge/executorch-bundle";
constexpr const char* kIoDomain = "crisp-edge/io/v1";

// --- bounded, verified file reads -------------------------------------------------------------
// stat first (refuse FIFOs, devices, directories and oversized files before opening), then open with
// O_NONBLOCK (a FIFO swapped in between cannot block the open) and fstat the descriptor: the same
// regular file, the same size; read exactly that many bytes and make sure nothing follows.
std::string read_file(const std::string& path, uint64_t max, int code, const std::string& what,
                      int64_t expect_size = -1) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) throw Fail{code, path + ": cannot read " + what + " (" + std::strerror(errno) + ")"};
  auto check = [&](const struct stat& s) {
    if (!S_ISREG(s.st_mode))
      throw Fail{code, path + ": " + what + " is not a regular file (a FIFO, device or directory); refusing to read it"};
    if (uint64_t(s.st_size) > max)
      throw Fail{code, path + ": " + what + " is " + std::to_string(s.st_size) + " bytes, more than the " +
                           std::to_string(max) + " any " + what + " may have; refusing to read it"};
    if (expect_size >= 0 && s.st_size != expect_size)
      throw Fail{code, path + ": " + what + " is " + std::to_string(s.st_size) + " bytes; its record says " +
                           std::to_string(expect_size) + " (changed after export, or truncated)"};
  };
  check(st);
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) throw Fail{code, path + ": cannot open " + what + " (" + std::strerror(errno) + ")"};
  struct stat fst;
  if (::fstat(fd, &fst) != 0) { ::close(fd); throw Fail{code, path + ": cannot stat " + what}; }
  try {
    check(fst);
    if (fst.st_ino != st.st_ino || fst.st_dev != st.st_dev) throw Fail{code, path + ": " + what + " was replaced while being opened"};
  } catch (...) { ::close(fd); throw; }
  std::string data(size_t(fst.st_size), '\0');
  size_t got = 0;
  while (got < data.size()) {
    ssize_t r = ::read(fd, &data[got], data.size() - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) { ::close(fd); throw Fail{code, path + ": " + what + " shrank or failed while being read"}; }
    got += size_t(r);
  }
  char extra;
  ssize_t r = ::read(fd, &extra, 1);
  ::close(fd);
  if (r != 0) throw Fail{code, path + ": " + what + " grew while being read"};
  return data;
}

std::string sha256_hex(const std::string& data) { return crisp::Sha256::hex_of(data.data(), data.size()); }

// --- names and shapes ----------------------------------------------------------------------------
// Names end up in file names (inputs, outputs, tasks): letters, digits, '_', '-', '.', 1..64, no leading '.'.
bool safe_name(const std::string& s) {
  if (s.empty() || s.size() > 64 || s[0] == '.') return false;
  for (char c : s)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.')) return false;
  return true;
}

// A relative path inside the bundle: '/'-separated safe components (no '.', '..', empty, absolute).
bool safe_relpath(const std::string& s) {
  if (s.empty() || s.size() > 255) return false;
  size_t start = 0;
  for (;;) {
    size_t slash = s.find('/', start);
    std::string part = s.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    if (!safe_name(part)) return false;
    if (slash == std::string::npos) return true;
    start = slash + 1;
  }
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

std::string dims_csv(const std::vector<int64_t>& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) out += (i ? "," : "") + std::to_string(s[i]);
  return out;
}

struct TensorSpec {
  std::string name, dtype = "float32";
  std::vector<int64_t> shape;
  int64_t numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

struct FileRec {
  std::string sha256;
  int64_t bytes = 0;
};

struct Manifest {
  std::string sha256, mode;
  std::map<std::string, FileRec> files;
  std::map<std::string, std::pair<std::string, FileRec>> tasks;  // name -> (file, record)
  std::vector<TensorSpec> inputs, outputs, set_task;
  bool has_head = false;
  int64_t num_classes = 0, max_classes = 0, in_features = 0, tag = 0;
  bool lm = false;  // a language-model bundle: forward(tokens [1, T], input_pos [T]) -> logits [1, vocab]
  int64_t max_seq_len = 0, vocab = 0;
};

// --- manifest.json --------------------------------------------------------------------------------
struct M {  // typed access with messages naming the field
  const std::string where;
  [[noreturn]] void bad(const std::string& field, const std::string& why) const {
    throw Fail{kBundle, where + ": " + field + " " + why + "; the manifest is damaged or was edited (export the bundle again)"};
  }
  const crisp::Json& need(const crisp::Json& obj, const std::string& key, crisp::Json::Type t, const std::string& field) const {
    const crisp::Json* v = obj.type == crisp::Json::Object ? obj.get(key) : nullptr;
    if (!v) bad(field, "is missing");
    if (v->type != t) bad(field, "has the wrong JSON type");
    return *v;
  }
  int64_t integer(const crisp::Json& v, const std::string& field, int64_t lo, int64_t hi) const {
    if (v.type != crisp::Json::Number || !v.is_int || v.i < lo || v.i > hi)
      bad(field, "must be an integer in " + std::to_string(lo) + ".." + std::to_string(hi));
    return v.i;
  }
  std::string name(const crisp::Json& v, const std::string& field) const {
    if (v.type != crisp::Json::String || !safe_name(v.s)) bad(field, "must be 1-64 letters, digits, '_', '-', '.'");
    return v.s;
  }
  std::vector<int64_t> shape(const crisp::Json& v, const std::string& field) const {
    if (v.type != crisp::Json::Array || v.a.empty() || v.a.size() > 8) bad(field, "must be a list of 1 to 8 sizes");
    std::vector<int64_t> s;
    uint64_t numel = 1;
    for (const auto& d : v.a) {
      s.push_back(integer(d, field, 1, int64_t(1) << 31));
      numel *= uint64_t(s.back());
      if (numel * 4 > kMaxTensorBytes) bad(field, "describes a tensor larger than " + std::to_string(kMaxTensorBytes) + " bytes");
    }
    return s;
  }
  FileRec record(const crisp::Json& v, const std::string& field) const {
    FileRec r;
    r.sha256 = need(v, "sha256", crisp::Json::String, field + ".sha256").s;
    bool hex = r.sha256.size() == 64;
    for (char c : r.sha256) hex = hex && ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
    if (!hex) bad(field + ".sha256", "must be 64 lower-case hex digits");
    r.bytes = integer(need(v, "bytes", crisp::Json::Number, field + ".bytes"), field + ".bytes", 0, int64_t(kMaxProgram));
    return r;
  }
  std::vector<TensorSpec> specs(const crisp::Json& list, const std::string& field, bool with_dtype,
                                bool int64_ok = false) const {
    if (list.a.empty() || list.a.size() > 1024) bad(field, "must hold 1 to 1024 entries");
    std::vector<TensorSpec> out;
    std::set<std::string> seen;
    for (size_t i = 0; i < list.a.size(); ++i) {
      std::string f = field + "[" + std::to_string(i) + "]";
      TensorSpec t;
      t.name = name(need(list.a[i], "name", crisp::Json::String, f + ".name"), f + ".name");
      if (!seen.insert(t.name).second) bad(f + ".name", "repeats the name " + t.name);
      if (with_dtype) {
        t.dtype = need(list.a[i], "dtype", crisp::Json::String, f + ".dtype").s;
        if (t.dtype != "float32" && !(int64_ok && t.dtype == "int64"))
          bad(f + ".dtype", "must be float32 (int64 only for a language model's token inputs)");
      }
      t.shape = shape(need(list.a[i], "shape", crisp::Json::Array, f + ".shape"), f + ".shape");
      out.push_back(std::move(t));
    }
    return out;
  }
};

Manifest read_manifest(const std::string& bundle, const std::string& pin) {
  std::string path = bundle + "/manifest.json";
  std::string text = read_file(path, kMaxManifest, kBundle, "bundle manifest");
  Manifest m;
  m.sha256 = sha256_hex(text);
  if (!pin.empty() && pin != m.sha256)
    throw Fail{kBundle, path + ": SHA-256 " + m.sha256 + " differs from the pinned " + pin + "; refusing this bundle"};
  crisp::Json j;
  try {
    j = crisp::JsonParser::parse(text);
  } catch (const crisp::JsonError& e) {
    throw Fail{kBundle, path + ": not valid JSON (" + e.what() + ")"};
  }
  M f{path};
  if (j.type != crisp::Json::Object) f.bad("the top level", "must be an object");
  if (f.need(j, "format", crisp::Json::String, "format").s != kFormat)
    f.bad("format", std::string("must be \"") + kFormat + "\" (is this a crisp-edge ExecuTorch bundle?)");
  int64_t version = f.integer(f.need(j, "version", crisp::Json::Number, "version"), "version", 1, 1 << 30);
  if (version > 1) throw Fail{kBundle, path + ": bundle version " + std::to_string(version) + " is newer than this runner (1); update the runner"};
  m.mode = f.need(j, "mode", crisp::Json::String, "mode").s;
  if (m.mode != "dense" && m.mode != "factored" && m.mode != "swappable") f.bad("mode", "must be dense, factored or swappable");
  const auto& files = f.need(j, "files", crisp::Json::Object, "files");
  for (const auto& [name, rec] : files.o) {
    if (!safe_relpath(name)) f.bad("files[\"" + name.substr(0, 64) + "\"]", "is not a plain relative path inside the bundle");
    m.files[name] = f.record(rec, "files[\"" + name + "\"]");
  }
  if (!m.files.count("model.pte")) f.bad("files", "must list model.pte with its SHA-256");
  const crisp::Json* lm = j.get("lm");
  m.lm = lm && lm->type != crisp::Json::Null;
  m.inputs = f.specs(f.need(j, "inputs", crisp::Json::Array, "inputs"), "inputs", true, m.lm);
  m.outputs = f.specs(f.need(j, "outputs", crisp::Json::Array, "outputs"), "outputs", true);
  if (m.lm) {
    if (f.need(*lm, "kind", crisp::Json::String, "lm.kind").s != "causal-lm") f.bad("lm.kind", "must be \"causal-lm\"");
    m.max_seq_len = f.integer(f.need(*lm, "max_seq_len", crisp::Json::Number, "lm.max_seq_len"), "lm.max_seq_len", 2, 1 << 24);
    m.vocab = f.integer(f.need(*lm, "vocab_size", crisp::Json::Number, "lm.vocab_size"), "lm.vocab_size", 2, 1 << 24);
    if (m.inputs.size() != 2 || m.inputs[0].name != "tokens" || m.inputs[0].dtype != "int64" ||
        m.inputs[0].shape != std::vector<int64_t>{1, m.max_seq_len} || m.inputs[1].name != "input_pos" ||
        m.inputs[1].dtype != "int64" || m.inputs[1].shape != std::vector<int64_t>{m.max_seq_len})
      f.bad("inputs", "of a language-model bundle must be tokens int64 [1, max_seq_len] and input_pos int64 [max_seq_len]");
    if (m.outputs.size() != 1 || m.outputs[0].shape != std::vector<int64_t>{1, m.vocab})
      f.bad("outputs", "of a language-model bundle must be one logits tensor [1, vocab_size]");
  }
  const crisp::Json* tasks = j.get("tasks");
  if (tasks && tasks->type != crisp::Json::Object) f.bad("tasks", "must be an object");
  if (m.mode == "swappable") {
    if (!m.files.count("default.ptd")) f.bad("files", "of a swappable bundle must list default.ptd");
    const auto& s = f.need(j, "swappable", crisp::Json::Object, "swappable");
    m.tag = f.integer(f.need(s, "tag", crisp::Json::Number, "swappable.tag"), "swappable.tag", 0, INT64_MAX);
    m.set_task = f.specs(f.need(s, "set_task_inputs", crisp::Json::Array, "swappable.set_task_inputs"),
                         "swappable.set_task_inputs", false);
    const crisp::Json* head = s.get("head");
    if (!head) f.bad("swappable.head", "is missing (null when the model has no head)");
    if (head->type != crisp::Json::Null) {
      m.has_head = true;
      m.num_classes = f.integer(f.need(*head, "num_classes", crisp::Json::Number, "swappable.head.num_classes"), "swappable.head.num_classes", 1, 1 << 24);
      m.max_classes = f.integer(f.need(*head, "max_classes", crisp::Json::Number, "swappable.head.max_classes"), "swappable.head.max_classes", m.num_classes, 1 << 24);
      m.in_features = f.integer(f.need(*head, "in_features", crisp::Json::Number, "swappable.head.in_features"), "swappable.head.in_features", 1, 1 << 24);
      size_t n = m.set_task.size();
      if (n < 2 || m.set_task[n - 2].name != "head.weight" || m.set_task[n - 1].name != "head.bias" ||
          m.set_task[n - 2].shape != std::vector<int64_t>{m.max_classes, m.in_features} ||
          m.set_task[n - 1].shape != std::vector<int64_t>{m.max_classes})
        f.bad("swappable.set_task_inputs", "must end with head.weight [max_classes, in_features] and head.bias [max_classes]");
    }
    for (size_t i = 0; i < m.set_task.size(); ++i) {
      const auto& t = m.set_task[i];
      bool head_input = t.name == "head.weight" || t.name == "head.bias";
      if (head_input ? !m.has_head || i + 2 < m.set_task.size() : t.name.rfind("mixer.", 0) != 0)
        f.bad("swappable.set_task_inputs[" + std::to_string(i) + "]", "must be a mixer.<group> tensor (or the head, last)");
    }
    if (tasks)
      for (const auto& [name, rec] : tasks->o) {
        std::string field = "tasks[\"" + name.substr(0, 64) + "\"]";
        if (!safe_name(name) || name == "default") f.bad(field, "is not a valid task name");
        std::string file = f.need(rec, "file", crisp::Json::String, field + ".file").s;
        if (file != "tasks/" + name + ".ptd") f.bad(field + ".file", "must be tasks/" + name + ".ptd");
        FileRec r = f.record(rec, field);
        if (m.files.count(file) && m.files[file].sha256 != r.sha256) f.bad(field, "disagrees with files[\"" + file + "\"]");
        m.tasks[name] = {file, r};
      }
  } else {
    if (j.get("swappable")) f.bad("swappable", "must be absent in a " + m.mode + " bundle");
    if (tasks && !tasks->o.empty()) f.bad("tasks", "must be empty in a " + m.mode + " bundle");
  }
  return m;
}

// The bundle's I/O contract as text; its tag (the program's crisp_io constant) binds the manifest's
// names, order and shapes to the program. Same bytes as crisp_edge.export.executorch.digest.io_spec_text.
std::string io_spec_text(const Manifest& m) {
  std::string t = std::string(kIoDomain) + "\nmode " + m.mode + "\n";
  for (const auto& i : m.inputs) t += "input " + i.name + " " + i.dtype + " " + dims_csv(i.shape) + "\n";
  for (const auto& o : m.outputs) t += "output " + o.name + " " + o.dtype + " " + dims_csv(o.shape) + "\n";
  if (m.mode == "swappable") {
    for (const auto& s : m.set_task) t += "set_task " + s.name + " float32 " + dims_csv(s.shape) + "\n";
    t += m.has_head ? "head " + std::to_string(m.num_classes) + " " + std::to_string(m.max_classes) + " " +
                          std::to_string(m.in_features) + "\n"
                    : std::string("head none\n");
    t += "tag " + std::to_string(m.tag) + "\n";
  }
  return t;
}

int64_t io_tag(const std::string& text) {  // the first 60 bits of SHA-256(text), as a positive int64
  return int64_t(std::strtoull(sha256_hex(text).substr(0, 15).c_str(), nullptr, 16));
}

// --- the program ------------------------------------------------------------------------------------
int64_t constant(Module& module, const std::string& method) {
  auto r = module.execute(method);
  if (!r.ok() || r->size() != 1 || !(*r)[0].isInt())
    throw Fail{kBundle, "the program's " + method + " method does not return one integer: not a crisp-edge program"};
  return (*r)[0].toInt();
}

void check_tensor_meta(const executorch::runtime::Result<executorch::runtime::TensorInfo>& info,
                       const std::vector<int64_t>& want, const std::string& what, const std::string& dtype = "float32") {
  if (!info.ok()) throw Fail{kBundle, what + " is not a tensor in the program"};
  if (info->scalar_type() != (dtype == "int64" ? ScalarType::Long : ScalarType::Float))
    throw Fail{kBundle, what + " is not " + dtype + " in the program"};
  std::vector<int64_t> got(info->sizes().begin(), info->sizes().end());
  if (got != want)
    throw Fail{kBundle, what + " has shape " + shape_str(got) + " in the program, " + shape_str(want) +
                            " in manifest.json: the manifest does not describe this program (edited?)"};
}

void check_method(Module& module, const std::string& method, const std::vector<TensorSpec>& ins,
                  const std::vector<std::vector<int64_t>>* outs) {
  auto meta = module.method_meta(method);
  if (!meta.ok()) throw Fail{kProgram, "the program's " + method + " method cannot be read (error " + std::to_string(int(meta.error())) + ")"};
  if (meta->num_inputs() != ins.size())
    throw Fail{kBundle, method + " takes " + std::to_string(meta->num_inputs()) + " inputs in the program, " +
                            std::to_string(ins.size()) + " in manifest.json: the manifest does not describe this program"};
  for (size_t i = 0; i < ins.size(); ++i)
    check_tensor_meta(meta->input_tensor_meta(i), ins[i].shape, method + " input " + std::to_string(i) + " (" + ins[i].name + ")",
                      ins[i].dtype);
  if (outs) {
    if (meta->num_outputs() != outs->size())
      throw Fail{kBundle, method + " gives " + std::to_string(meta->num_outputs()) + " outputs in the program, " +
                              std::to_string(outs->size()) + " in manifest.json"};
    for (size_t i = 0; i < outs->size(); ++i)
      check_tensor_meta(meta->output_tensor_meta(i), (*outs)[i], method + " output " + std::to_string(i));
  }
}

// Methods, shapes, dtypes and constants of the (hash-checked) program against the manifest.
void check_program(Module& module, const Manifest& m) {
  auto names = module.method_names();
  if (!names.ok()) throw Fail{kProgram, "the program's methods cannot be listed"};
  bool swap_methods = names->count("set_task") || names->count("crisp_tag");
  if (!names->count("forward")) throw Fail{kBundle, "the program has no forward method"};
  if (m.mode == "swappable" && !(names->count("set_task") && names->count("crisp_tag")))
    throw Fail{kBundle, "manifest.json says swappable, but the program has no set_task/crisp_tag: the manifest was edited"};
  if (m.mode != "swappable" && swap_methods)
    throw Fail{kBundle, "manifest.json says " + m.mode + ", but the program is swappable (it has set_task): the "
                        "manifest was edited, and forward without set_task would read uninitialised weights"};
  std::vector<std::vector<int64_t>> outs;
  for (const auto& o : m.outputs) {
    auto s = o.shape;
    if (m.has_head) {
      if (s.back() != m.num_classes)
        throw Fail{kBundle, "manifest.json: output " + o.name + " has " + std::to_string(s.back()) + " classes, head.num_classes is " + std::to_string(m.num_classes)};
      s.back() = m.max_classes;  // the program's head capacity; outputs are cut to the task's classes
    }
    outs.push_back(s);
  }
  check_method(module, "forward", m.inputs, &outs);
  if (names->count("decode")) {  // a swappable XNNPACK LM's one-token step (generate uses it for one token)
    if (!m.lm) throw Fail{kBundle, "the program has a decode method but manifest.json has no lm section: edited"};
    std::vector<TensorSpec> one = m.inputs;
    one[0].shape = {1, 1};
    one[1].shape = {1};
    check_method(module, "decode", one, &outs);
  }
  if (m.mode == "swappable") {
    check_method(module, "set_task", m.set_task, nullptr);
    int64_t tag = constant(module, "crisp_tag");
    if (tag != m.tag)
      throw Fail{kBundle, "the program's crisp_tag " + std::to_string(tag) + " differs from manifest.json's " +
                              std::to_string(m.tag) + ": files from different exports"};
  }
  if (names->count("crisp_io")) {
    int64_t want = io_tag(io_spec_text(m)), got = constant(module, "crisp_io");
    if (got != want)
      throw Fail{kBundle, "manifest.json's inputs, outputs, set_task inputs or head (names, order, shapes) are not "
                          "the ones this program was exported with (crisp_io " + std::to_string(got) + " != " +
                          std::to_string(want) + "): the manifest was edited. Export the bundle again"};
  } else {
    std::cerr << "crisp_et_runner: note: this program has no crisp_io constant (exported before crisp-edge bound "
                 "manifest names to programs); shapes and methods are checked, the order of same-shaped inputs "
                 "is not. Re-export the bundle, or pin its manifest with --manifest-sha256\n";
  }
}

// --- .npy (little-endian float32, C order) --------------------------------------------------------
// The header dict numpy writes: {'descr': '<f4', 'fortran_order': False, 'shape': (...), } + spaces + '\n'.
std::vector<int64_t> parse_npy_header(const std::string& h, const std::string& path) {
  auto bad = [&](const std::string& why) { return Fail{kUsage, path + ": bad .npy header (" + why + ")"}; };
  size_t p = 0;
  auto ws = [&] { while (p < h.size() && h[p] == ' ') ++p; };
  auto expect = [&](char c) { ws(); if (p >= h.size() || h[p] != c) throw bad(std::string("expected '") + c + "'"); ++p; };
  auto quoted = [&] {
    ws();
    if (p >= h.size() || h[p] != '\'') throw bad("expected a quoted string");
    size_t e = h.find('\'', p + 1);
    if (e == std::string::npos) throw bad("unterminated string");
    std::string s = h.substr(p + 1, e - p - 1);
    p = e + 1;
    return s;
  };
  std::vector<int64_t> shape;
  bool descr = false, order = false, has_shape = false;
  expect('{');
  for (;;) {
    ws();
    if (p < h.size() && h[p] == '}') { ++p; break; }
    std::string key = quoted();
    expect(':');
    ws();
    if (key == "descr" && !descr) {
      if (quoted() != "<f4") throw Fail{kUsage, path + ": dtype must be float32 ('<f4')"};
      descr = true;
    } else if (key == "fortran_order" && !order) {
      if (h.compare(p, 5, "False") != 0) throw Fail{kUsage, path + ": must be C order (fortran_order False)"};
      p += 5;
      order = true;
    } else if (key == "shape" && !has_shape) {
      expect('(');
      for (;;) {
        ws();
        if (p < h.size() && h[p] == ')') { ++p; break; }
        size_t s = p;
        while (p < h.size() && h[p] >= '0' && h[p] <= '9') ++p;
        if (p == s || p - s > 10) throw bad("a malformed dimension");
        shape.push_back(std::stoll(h.substr(s, p - s)));
        if (shape.size() > 8) throw bad("more than 8 dimensions");
        ws();
        if (p < h.size() && h[p] == ',') ++p;
        else if (p >= h.size() || h[p] != ')') throw bad("expected ',' or ')'");
      }
      has_shape = true;
    } else {
      throw bad("unknown or repeated key '" + key.substr(0, 32) + "'");
    }
    ws();
    if (p < h.size() && h[p] == ',') ++p;
  }
  if (!(descr && order && has_shape)) throw bad("descr, fortran_order and shape are required");
  while (p < h.size() && h[p] == ' ') ++p;
  if (p + 1 != h.size() || h[p] != '\n') throw bad("trailing bytes after the dict");
  return shape;
}

std::vector<float> read_npy(const std::string& path, const std::vector<int64_t>& want) {
  int64_t n = 1;
  for (auto d : want) n *= d;
  std::string data = read_file(path, uint64_t(n) * 4 + 65536 + 12, kUsage, "input .npy file");
  if (data.size() < 10 || std::memcmp(data.data(), "\x93NUMPY", 6) != 0) throw Fail{kUsage, path + ": not a .npy file"};
  int major = static_cast<unsigned char>(data[6]);
  size_t pre = major == 1 ? 10 : 12;
  if ((major != 1 && major != 2 && major != 3) || data.size() < pre) throw Fail{kUsage, path + ": unsupported .npy version"};
  uint32_t hlen = static_cast<unsigned char>(data[8]) | (static_cast<unsigned char>(data[9]) << 8);
  if (major != 1) hlen |= (uint32_t(static_cast<unsigned char>(data[10])) << 16) | (uint32_t(static_cast<unsigned char>(data[11])) << 24);
  if (hlen > 65536 || pre + hlen > data.size()) throw Fail{kUsage, path + ": bad .npy header length"};
  std::vector<int64_t> shape = parse_npy_header(data.substr(pre, hlen), path);
  if (shape != want) throw Fail{kUsage, path + ": shape " + shape_str(shape) + ", the program takes " + shape_str(want)};
  if (data.size() - pre - hlen != uint64_t(n) * 4)
    throw Fail{kUsage, path + ": holds " + std::to_string(data.size() - pre - hlen) + " data bytes, the shape needs " + std::to_string(n * 4)};
  std::vector<float> out(n);
  std::memcpy(out.data(), data.data() + pre + hlen, size_t(n) * 4);
  for (float v : out)
    if (!std::isfinite(v)) throw Fail{kUsage, path + ": holds NaN or infinite values"};
  return out;
}

void write_output(const std::string& path, const std::string& bytes);

void write_npy(const std::string& path, const float* data, const std::vector<int64_t>& shape) {
  std::string dims;
  for (auto d : shape) dims += std::to_string(d) + ",";
  if (shape.size() > 1) dims.pop_back();
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  while ((10 + header.size() + 1) % 64) header += ' ';
  header += '\n';
  int64_t n = 1;
  for (auto d : shape) n *= d;
  std::string bytes("\x93NUMPY\x01\x00", 8);
  bytes += char(header.size() & 0xFF);
  bytes += char(header.size() >> 8);
  bytes += header;
  bytes.append(reinterpret_cast<const char*>(data), size_t(n) * 4);
  write_output(path, bytes);
}

// An output file: written to a fresh PATH.tmp, then renamed into place (never through a link or FIFO).
void write_output(const std::string& path, const std::string& bytes) {
  std::string tmp = path + ".tmp";
  ::unlink(tmp.c_str());  // a stale file, link or FIFO of that name: O_EXCL below creates a fresh file
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK, 0644);
  if (fd < 0) throw Fail{kUsage, tmp + ": cannot create an output file (" + std::strerror(errno) + ")"};
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) { ::close(fd); ::unlink(tmp.c_str()); throw Fail{kUsage, tmp + ": cannot write output (" + std::strerror(errno) + ")"}; }
    done += size_t(w);
  }
  if (::close(fd) != 0 || std::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    throw Fail{kUsage, path + ": cannot write output"};
  }
}

// --- task .ptd files ---------------------------------------------------------------------------------
struct Task {
  std::string bytes;                       // the verified file contents; tensors point into them
  std::map<std::string, crisp::PtdTensor> tensors;
  int64_t classes = 0;                     // head rows (0: no head in the file)
};

std::string real(const std::string& p) {
  char buf[PATH_MAX];
  return ::realpath(p.c_str(), buf) ? std::string(buf) : std::string();
}

// Cuts crisp.mixers (float32 [N]: every mixer group, flattened and concatenated by name) into the
// mixer groups set_task takes, as views into the file's bytes. Only after the file's tag matched the
// program's: the tag pins the layout, so this is the cut the file was written with. A file without
// crisp.mixers (written before it: one tensor per group) is left as it is.
void unpack_mixers(Task& t, const Manifest& m, const std::string& path) {
  auto packed = t.tensors.find(crisp::kMixersKey);
  if (packed == t.tensors.end()) return;
  std::vector<const TensorSpec*> groups;
  for (const auto& s : m.set_task)
    if (s.name != "head.weight" && s.name != "head.bias") groups.push_back(&s);
  std::sort(groups.begin(), groups.end(), [](const TensorSpec* a, const TensorSpec* b) { return a->name < b->name; });
  int64_t total = 0;
  for (const auto* s : groups) total += s->numel();
  const crisp::PtdTensor x = packed->second;
  if (x.dtype != crisp::kFloat || x.sizes != std::vector<int64_t>{total})
    throw Fail{kTask, path + ": its crisp.mixers is not float32 [" + std::to_string(total) + "] (this program's " +
                      std::to_string(groups.size()) + " mixer groups); convert the task's mixer file for this bundle"};
  t.tensors.erase(packed);
  size_t at = 0;
  for (const auto* s : groups) {
    if (t.tensors.count(s->name))
      throw Fail{kTask, path + ": holds " + s->name + " both in crisp.mixers and as a tensor of its own"};
    size_t nbytes = static_cast<size_t>(s->numel()) * 4;
    t.tensors[s->name] = crisp::PtdTensor{s->name, crisp::kFloat, s->shape, x.data + at, nbytes};
    at += nbytes;
  }
}

// Reads and checks a task file. `record`: its manifest record (a file of the bundle), or null for a
// file given by path, which must then carry a crisp.digest that matches its contents.
Task read_task(const std::string& path, const FileRec* record, const Manifest& m) {
  Task t;
  t.bytes = read_file(path, kMaxPtd, kTask, "task file", record ? record->bytes : -1);
  if (record && sha256_hex(t.bytes) != record->sha256)
    throw Fail{kTask, path + ": does not match its SHA-256 in manifest.json; it was changed after export. Convert the "
                      "task's mixer file again (crisp-edge export-task)"};
  std::vector<crisp::PtdTensor> list;
  try {
    list = crisp::PtdReader(reinterpret_cast<const uint8_t*>(t.bytes.data()), t.bytes.size()).tensors();
  } catch (const crisp::PtdError& e) {
    throw Fail{kTask, path + ": " + e.what()};
  }
  for (auto& x : list) t.tensors[x.name] = x;
  auto tag = t.tensors.find(crisp::kTagKey);
  if (tag == t.tensors.end() || tag->second.dtype != crisp::kLong || tag->second.sizes != std::vector<int64_t>{1})
    throw Fail{kTask, path + ": holds no crisp.tag tensor (int64 [1]): not a crisp-edge task file"};
  auto dig = t.tensors.find(crisp::kDigestKey);
  if (dig != t.tensors.end()) {
    if (dig->second.dtype != crisp::kByte || dig->second.sizes != std::vector<int64_t>{32})
      throw Fail{kTask, path + ": its crisp.digest is not a uint8 [32] tensor: a damaged task file"};
    uint8_t want[32];
    crisp::ptd_digest(list, want);
    if (std::memcmp(want, dig->second.data, 32) != 0)
      throw Fail{kTask, path + ": its contents do not match its crisp.digest (damaged or edited after export); "
                        "re-export the task with `crisp-edge export-task`"};
  }
  int64_t file_tag = 0;
  std::memcpy(&file_tag, tag->second.data, 8);
  if (file_tag != m.tag)
    throw Fail{kTask, path + ": made for other bases or another layout (tag " + std::to_string(file_tag) +
                      ", this program's " + std::to_string(m.tag) + "); refusing to run it"};
  if (dig == t.tensors.end() && !record) {
    throw Fail{kTask, path + ": a task file given by path must carry a crisp.digest (this one was written before "
                      "task files carried one, or is not from crisp-edge). Re-export the task with `crisp-edge "
                      "export-task BUNDLE MIXERS.safetensors`, or ship it inside the bundle (tasks/NAME.ptd, hashed in "
                      "manifest.json)"};
  }
  unpack_mixers(t, m, path);
  std::set<std::string> known = {crisp::kTagKey, crisp::kDigestKey};
  for (const auto& s : m.set_task) known.insert(s.name);
  for (const auto& [name, x] : t.tensors)
    if (!known.count(name)) throw Fail{kTask, path + ": holds the tensor " + name + ", which set_task does not take"};
  for (const auto& s : m.set_task) {
    auto it = t.tensors.find(s.name);
    bool head = s.name == "head.weight" || s.name == "head.bias";
    if (it == t.tensors.end()) {
      if (!head) throw Fail{kTask, path + ": lacks " + s.name};
      continue;
    }
    const auto& x = it->second;
    if (x.dtype != crisp::kFloat) throw Fail{kTask, path + ": " + s.name + " is not float32"};
    bool ok = x.sizes.size() == s.shape.size();
    for (size_t i = 0; ok && i < x.sizes.size(); ++i)
      ok = head && i == 0 ? (x.sizes[0] >= 1 && x.sizes[0] <= s.shape[0]) : x.sizes[i] == s.shape[i];
    if (!ok) throw Fail{kTask, path + ": " + s.name + " has shape " + shape_str(x.sizes) + ", the program takes " + shape_str(s.shape)};
    if (head) {
      if (t.classes && t.classes != x.sizes[0]) throw Fail{kTask, path + ": head.weight and head.bias disagree on the class count"};
      t.classes = x.sizes[0];
    }
    for (size_t i = 0; i < x.nbytes / 4; ++i) {  // memcpy: segment data need not be 4-byte aligned
      float f;
      std::memcpy(&f, x.data + 4 * i, 4);
      if (!std::isfinite(f)) throw Fail{kTask, path + ": " + s.name + " holds NaN or infinite values"};
    }
  }
  if (t.tensors.count("head.weight") != t.tensors.count("head.bias"))
    throw Fail{kTask, path + ": holds only one of head.weight and head.bias"};
  return t;
}

// Feeds a checked task (tensors it lacks come from default.ptd) to set_task; returns its class count.
int64_t apply_task(Module& module, const Manifest& m, const Task& task, const Task& fallback, const std::string& where) {
  std::vector<TensorPtr> keep;
  std::vector<EValue> inputs;
  for (const auto& s : m.set_task) {
    auto it = task.tensors.find(s.name);
    const crisp::PtdTensor& x = it != task.tensors.end() ? it->second : fallback.tensors.at(s.name);
    std::vector<float> full(size_t(s.numel()), 0.0f);  // a smaller head is zero-padded to the capacity
    std::memcpy(full.data(), x.data, x.nbytes);
    std::vector<executorch::aten::SizesType> sizes(s.shape.begin(), s.shape.end());
    keep.push_back(make_tensor_ptr(sizes, std::move(full)));
    inputs.emplace_back(keep.back());
  }
  auto r = module.execute("set_task", inputs);
  if (!r.ok()) throw Fail{kProgram, where + ": set_task failed (error " + std::to_string(int(r.error())) + ")"};
  return task.classes ? task.classes : fallback.classes;
}

void run_cases(Module& module, const Manifest& m, const std::string& in_dir, const std::string& out_dir,
               const std::string& task, int cases, int64_t classes) {
  for (int i = 0; i < cases; ++i) {
    std::vector<TensorPtr> keep;
    std::vector<EValue> inputs;
    for (const auto& in : m.inputs) {
      auto data = read_npy(in_dir + "/input." + std::to_string(i) + "." + in.name + ".npy", in.shape);
      std::vector<executorch::aten::SizesType> sizes(in.shape.begin(), in.shape.end());
      keep.push_back(make_tensor_ptr(sizes, std::move(data)));
      inputs.emplace_back(keep.back());
    }
    auto r = module.execute("forward", inputs);
    if (!r.ok()) throw Fail{kProgram, "forward failed on case " + std::to_string(i) + " (error " + std::to_string(int(r.error())) + ")"};
    if (r->size() != m.outputs.size()) throw Fail{kProgram, "forward gave " + std::to_string(r->size()) + " outputs"};
    for (size_t k = 0; k < m.outputs.size(); ++k) {
      if (!(*r)[k].isTensor()) throw Fail{kProgram, "forward's output " + std::to_string(k) + " is not a tensor"};
      const auto& t = (*r)[k].toTensor();
      if (t.scalar_type() != ScalarType::Float) throw Fail{kProgram, "forward's output " + std::to_string(k) + " is not float32"};
      std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
      const float* src = t.const_data_ptr<float>();
      std::vector<float> out(src, src + t.numel());
      int64_t last = shape.back();
      if (classes > 0 && classes < last) {  // cut a padded head's logits to the task's classes
        int64_t rows = t.numel() / last;
        std::vector<float> cut(size_t(rows * classes));
        for (int64_t row = 0; row < rows; ++row) std::memcpy(&cut[row * classes], &out[row * last], classes * 4);
        out.swap(cut);
        shape.back() = classes;
      }
      for (float v : out)
        if (!std::isfinite(v))
          throw Fail{kProgram, "forward gave NaN or infinite values on case " + std::to_string(i) + " of task " + task + "; no output written"};
      write_npy(out_dir + "/output." + task + "." + std::to_string(i) + "." + m.outputs[k].name + ".npy", out.data(), shape);
    }
  }
}

// Greedy decoding (argmax, ties to the lowest id, as crisp_edge.generation.sampling): the prompt in one
// forward (prefill), then one token per step; stops after n tokens or when the cache is full. A step of one
// token runs the program's decode method when it has one (a swappable XNNPACK LM: the same step with its
// task weights read in place by crisp::rowmajor_linear, compiled into this runner), else forward.
std::vector<int64_t> generate(Module& module, const Manifest& m, const std::vector<int64_t>& prompt, int n,
                              const std::string& task) {
  std::vector<int64_t> out, feed = prompt;
  int64_t pos = 0;
  auto names = module.method_names();
  const bool has_decode = names.ok() && names->count("decode");
  while (int(out.size()) < n && pos + int64_t(feed.size()) <= m.max_seq_len) {
    std::vector<int64_t> positions(feed.size());
    for (size_t i = 0; i < feed.size(); ++i) positions[i] = pos + int64_t(i);
    auto tokens = make_tensor_ptr({1, executorch::aten::SizesType(feed.size())}, std::vector<int64_t>(feed));
    auto where = make_tensor_ptr({executorch::aten::SizesType(feed.size())}, std::move(positions));
    const std::string method = feed.size() == 1 && has_decode ? "decode" : "forward";
    auto r = module.execute(method, std::vector<EValue>{EValue(tokens), EValue(where)});
    if (!r.ok()) throw Fail{kProgram, method + " failed at position " + std::to_string(pos) + " of task " + task + " (error " + std::to_string(int(r.error())) + ")"};
    if (r->size() != 1 || !(*r)[0].isTensor()) throw Fail{kProgram, method + " did not give one logits tensor"};
    const auto& t = (*r)[0].toTensor();
    if (t.scalar_type() != ScalarType::Float || t.numel() != m.vocab)
      throw Fail{kProgram, "forward gave " + std::to_string(t.numel()) + " logits, the vocabulary has " + std::to_string(m.vocab)};
    const float* v = t.const_data_ptr<float>();
    int64_t best = 0;
    for (int64_t i = 0; i < m.vocab; ++i) {
      if (!std::isfinite(v[i])) throw Fail{kProgram, "forward gave NaN or infinite logits in task " + task};
      if (v[i] > v[best]) best = i;
    }
    out.push_back(best);
    pos += int64_t(feed.size());
    feed.assign(1, best);
  }
  return out;
}

std::vector<int64_t> parse_ids(const std::string& v) {
  std::vector<int64_t> ids;
  size_t i = 0;
  while (i <= v.size()) {
    size_t j = v.find(',', i);
    std::string t = v.substr(i, j == std::string::npos ? std::string::npos : j - i);
    if (t.empty() || t.size() > 9 || t.find_first_not_of("0123456789") != std::string::npos)
      throw Fail{kUsage, "--generate takes comma-separated token ids (1,2,3), got " + v.substr(0, 80)};
    ids.push_back(std::atoll(t.c_str()));
    if (j == std::string::npos) break;
    i = j + 1;
  }
  return ids;
}

int parse_cases(const std::string& v) {
  if (v.empty() || v.size() > 6) throw Fail{kUsage, "--cases takes a whole number 1.." + std::to_string(kMaxCases) + ", got " + v.substr(0, 32)};
  for (char c : v)
    if (c < '0' || c > '9') throw Fail{kUsage, "--cases takes a whole number 1.." + std::to_string(kMaxCases) + ", got " + v};
  int n = std::atoi(v.c_str());
  if (n < 1 || n > kMaxCases) throw Fail{kUsage, "--cases takes a whole number 1.." + std::to_string(kMaxCases) + ", got " + v};
  return n;
}

bool is_dir(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

int tool(const std::string& cmd, const std::string& arg) {
  if (cmd == "--sha256") {
    std::cout << sha256_hex(read_file(arg, kMaxProgram, kUsage, "file")) << "\n";
    return kOk;
  }
  if (cmd == "--ptd-digest") {
    std::string bytes = read_file(arg, kMaxPtd, kTask, "task file");
    std::vector<crisp::PtdTensor> list;
    try {
      list = crisp::PtdReader(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()).tensors();
    } catch (const crisp::PtdError& e) {
      throw Fail{kTask, arg + ": " + e.what()};
    }
    uint8_t d[32];
    crisp::ptd_digest(list, d);
    std::cout << "digest " << crisp::Sha256::hex(d) << "\nstored ";
    bool stored = false;
    for (const auto& t : list)
      if (t.name == crisp::kDigestKey && t.nbytes == 32) {
        std::cout << crisp::Sha256::hex(t.data) << "\n";
        stored = true;
      }
    if (!stored) std::cout << "none\n";
    return kOk;
  }
  Manifest m = read_manifest(arg, "");  // --io-spec
  std::string text = io_spec_text(m);
  std::cout << text << "io_tag " << io_tag(text) << "\n";
  return kOk;
}

int run(int argc, char** argv) {
  const std::string usage =
      "usage: crisp_et_runner BUNDLE_DIR OUT_DIR --inputs IN_DIR --cases N [--task NAME[=PATH.ptd] ...] "
      "[--manifest-sha256 HEX]\n       crisp_et_runner LM_BUNDLE_DIR OUT_DIR --generate ID,ID,... --max-new-tokens N "
      "[--task NAME[=PATH.ptd] ...] [--manifest-sha256 HEX]\n       crisp_et_runner --sha256 FILE | --ptd-digest FILE.ptd | --io-spec BUNDLE_DIR";
  if (argc == 3 && (std::string(argv[1]) == "--sha256" || std::string(argv[1]) == "--ptd-digest" ||
                    std::string(argv[1]) == "--io-spec"))
    return tool(argv[1], argv[2]);
  if (argc < 3 || argv[1][0] == '-' || argv[2][0] == '-') throw Fail{kUsage, usage};
  std::string bundle = argv[1], out_dir = argv[2], in_dir, pin, gen;
  int cases = -1, new_tokens = -1;
  std::vector<std::pair<std::string, std::string>> tasks;  // name, path ("" = the bundle's task NAME)
  std::set<std::string> task_names;
  for (int i = 3; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) throw Fail{kUsage, "missing value after " + a.substr(0, 64) + "\n" + usage};
    std::string v = argv[++i];
    if (a == "--inputs" && in_dir.empty()) in_dir = v;
    else if (a == "--cases" && cases < 0) cases = parse_cases(v);
    else if (a == "--generate" && gen.empty()) gen = v;
    else if (a == "--max-new-tokens" && new_tokens < 0) new_tokens = parse_cases(v);
    else if (a == "--manifest-sha256" && pin.empty()) {
      bool hex = v.size() == 64;
      for (char c : v) hex = hex && ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
      if (!hex) throw Fail{kUsage, "--manifest-sha256 takes 64 lower-case hex digits"};
      pin = v;
    } else if (a == "--task") {
      auto eq = v.find('=');
      std::string name = v.substr(0, eq), path = eq == std::string::npos ? "" : v.substr(eq + 1);
      if (!safe_name(name)) throw Fail{kUsage, "--task takes NAME or NAME=PATH.ptd (NAME: 1-64 letters, digits, '_', '-', '.'), got " + v.substr(0, 80)};
      if (eq != std::string::npos && path.empty()) throw Fail{kUsage, "--task " + name + "= names no file"};
      if (!task_names.insert(name).second) throw Fail{kUsage, "--task " + name + " is given twice (its outputs would overwrite each other)"};
      tasks.emplace_back(name, path);
    } else {
      throw Fail{kUsage, "unknown or repeated argument " + a.substr(0, 64) + "\n" + usage};
    }
  }
  std::vector<int64_t> prompt;
  if (!gen.empty()) {
    if (!in_dir.empty() || cases >= 0 || new_tokens < 0)
      throw Fail{kUsage, "--generate IDS takes --max-new-tokens N (and no --inputs / --cases)\n" + usage};
    prompt = parse_ids(gen);
  } else {
    if (in_dir.empty() || cases < 0) throw Fail{kUsage, "--inputs IN_DIR and --cases N are required\n" + usage};
    if (!is_dir(in_dir)) throw Fail{kUsage, in_dir + ": --inputs must be a folder"};
  }
  if (!is_dir(out_dir)) throw Fail{kUsage, out_dir + ": the output folder must exist"};
  if (!is_dir(bundle)) throw Fail{kBundle, bundle + ": not a bundle folder"};

  Manifest m = read_manifest(bundle, pin);
  if (m.lm != !gen.empty())
    throw Fail{kUsage, m.lm ? "a language-model bundle runs with --generate IDS --max-new-tokens N"
                            : "--generate needs a language-model bundle (its manifest has no lm section)"};
  for (auto id : prompt)
    if (id >= m.vocab) throw Fail{kUsage, "--generate: token id " + std::to_string(id) + " is outside the vocabulary (" + std::to_string(m.vocab) + ")"};
  if (m.lm && int64_t(prompt.size()) >= m.max_seq_len)
    throw Fail{kUsage, "--generate: the prompt has " + std::to_string(prompt.size()) + " tokens but the key/value cache holds " +
                           std::to_string(m.max_seq_len) + ", leaving no room to generate"};
  if (m.mode != "swappable" && !tasks.empty()) throw Fail{kUsage, "a " + m.mode + " bundle has no tasks to switch"};
  const FileRec& prec = m.files.at("model.pte");
  std::string pte_path = bundle + "/model.pte";
  std::string program;
  try {
    program = read_file(pte_path, kMaxProgram, kProgram, "program", prec.bytes);
  } catch (const Fail& f) {
    throw Fail{kProgram, "cannot load the program: " + f.msg};
  }
  if (sha256_hex(program) != prec.sha256)
    throw Fail{kProgram, pte_path + ": cannot load the program: it does not match its SHA-256 in manifest.json "
                                    "(damaged or changed after export); export the bundle again"};
  Module module(std::make_unique<BufferDataLoader>(program.data(), program.size()), nullptr, nullptr, nullptr, nullptr,
                /*share_memory_arenas=*/true);
  Error err = module.load(Program::Verification::InternalConsistency);
  if (err != Error::Ok) throw Fail{kProgram, pte_path + ": cannot load the program (error " + std::to_string(int(err)) + ")"};
  check_program(module, m);
  auto work = [&](const std::string& name, int64_t classes) {
    if (!m.lm) return run_cases(module, m, in_dir, out_dir, name, cases, classes);
    auto ids = generate(module, m, prompt, new_tokens, name);
    std::string text;
    for (size_t i = 0; i < ids.size(); ++i) text += (i ? "," : "") + std::to_string(ids[i]);
    std::string path = out_dir + "/tokens." + name + ".txt";
    write_output(path, text + "\n");
    std::cout << "task " << name << ": " << text << "\n";
  };
  if (m.mode != "swappable") {
    work("default", 0);
    if (!m.lm) std::cout << "ran " << cases << " cases of a " << m.mode << " bundle\n";
    return kOk;
  }
  const FileRec& drec = m.files.at("default.ptd");
  Task fallback = read_task(bundle + "/default.ptd", &drec, m);
  for (const auto& s : m.set_task)
    if (!fallback.tensors.count(s.name)) throw Fail{kBundle, bundle + "/default.ptd: lacks " + s.name};
  if (m.has_head && fallback.classes != m.num_classes)
    throw Fail{kBundle, bundle + "/default.ptd: its head has " + std::to_string(fallback.classes) + " classes, manifest.json says " + std::to_string(m.num_classes)};
  if (tasks.empty()) tasks.emplace_back("default", "");
  for (const auto& [name, given] : tasks) {
    // A task of the bundle (by name, or a path that resolves to a file the manifest records) is checked
    // against its manifest SHA-256; any other path against its own crisp.digest.
    std::string path = given;
    const FileRec* rec = nullptr;
    if (given.empty()) {
      if (name == "default") {
        path = bundle + "/default.ptd";
        rec = &drec;
      } else if (m.tasks.count(name)) {
        path = bundle + "/" + m.tasks.at(name).first;
        rec = &m.tasks.at(name).second;
      } else {
        throw Fail{kUsage, "--task " + name + ": the bundle has no such task (give NAME=PATH.ptd for a file outside it)"};
      }
    } else {
      std::string r = real(given);
      if (r.empty()) throw Fail{kTask, given + ": cannot read task file (" + std::strerror(errno) + ")"};
      for (const auto& [file, frec] : m.files)
        if (r == real(bundle + "/" + file)) rec = &frec;
      for (const auto& [tname, t] : m.tasks)
        if (r == real(bundle + "/" + t.first)) rec = &t.second;
    }
    Task task = read_task(path, rec, m);
    int64_t classes = apply_task(module, m, task, fallback, path);
    work(name, classes);
    if (!m.lm) std::cout << "task " << name << ": ran " << cases << " cases\n";
  }
  return kOk;
}


int guarded(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Fail& f) {
    std::cerr << "crisp_et_runner: error: " << f.msg << "\n";
    return f.code;
  } catch (const std::bad_alloc&) {
    std::cerr << "crisp_et_runner: error: out of memory\n";
    return kInternal;
  } catch (const std::exception& e) {
    std::cerr << "crisp_et_runner: internal error: " << e.what() << "\n";
    return kInternal;
  }
}

}  // namespace

// The work runs in a child process: ExecuTorch's program loader is not hardened against a malformed
// program (a .pte whose manifest hash was updated to match it can crash it), so a signal in the child
// becomes exit code 4 with a message here instead of a crash of the runner. CRISP_ET_RUNNER_NO_FORK=1
// runs in-process (debuggers).
int main(int argc, char** argv) {
  const char* no_fork = std::getenv("CRISP_ET_RUNNER_NO_FORK");
  if (no_fork && std::string(no_fork) == "1") return guarded(argc, argv);
  std::cout.flush();
  pid_t pid = ::fork();
  if (pid < 0) return guarded(argc, argv);
  if (pid == 0) {
    int code = guarded(argc, argv);
    std::cout.flush();
    std::cerr.flush();
    std::_Exit(code);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) {
      std::cerr << "crisp_et_runner: internal error: lost the worker process\n";
      return kInternal;
    }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  int sig = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
  std::cerr << "crisp_et_runner: error: the ExecuTorch runtime crashed (signal " << sig << ", " << strsignal(sig)
            << ") while loading or running the program: model.pte is malformed although it matches its manifest "
               "record (a manifest re-hashed after the program changed?). Export the bundle again; outputs "
               "written before the crash are incomplete\n";
  return kProgram;
}
