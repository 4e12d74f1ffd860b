// crisp_et_runner: run a crisp-edge ExecuTorch bundle on device, with task switching.
//
//   crisp_et_runner BUNDLE_DIR OUT_DIR --inputs IN_DIR --cases N [--task NAME=PATH.ptd ...]
//
// Loads BUNDLE_DIR/model.pte (Module with share_memory_arenas=true: forward and set_task share the
// weight buffers) and the bundle's runner_spec.txt (input/output names and shapes, set_task inputs).
// Swappable bundles: for each --task (default: "default" = BUNDLE_DIR/default.ptd), reads the task
// .ptd with FlatTensorDataMap, refuses it unless its crisp.tag tensor equals the program's crisp_tag
// (other bases or another layout) and every tensor has the expected name, dtype and shape, fills
// tensors the file lacks (a kept head) from default.ptd, runs set_task, then forward on every case.
// Inputs: IN_DIR/input.{i}.{name}.npy (float32, C order); outputs: OUT_DIR/output.{task}.{i}.{name}.npy.
// Exit codes: 0 ok, 2 bad arguments or input files, 3 a task file refused, 4 a program that fails to load/run.
#include <executorch/extension/data_loader/file_data_loader.h>
#include <executorch/extension/flat_tensor/flat_tensor_data_map.h>
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

using executorch::aten::ScalarType;
using executorch::extension::FlatTensorDataMap;
using executorch::extension::make_tensor_ptr;
using executorch::extension::TensorPtr;
using executorch::extension::module::Module;
using executorch::extension::FileDataLoader;
using executorch::runtime::Error;
using executorch::runtime::EValue;

namespace {

struct Fail {
  int code;
  std::string msg;
};

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  int64_t numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

struct Spec {
  std::string mode;
  int64_t tag = 0;
  int64_t classes = 0;  // the exported head's class count (0: no head)
  std::vector<TensorSpec> inputs, set_task;
  std::vector<std::string> outputs;
};

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

TensorSpec read_tensor_spec(std::istringstream& ls) {
  TensorSpec t;
  size_t rank = 0;
  ls >> t.name >> rank;
  for (size_t i = 0; i < rank && ls; ++i) {
    int64_t d;
    ls >> d;
    t.shape.push_back(d);
  }
  if (!ls || t.shape.size() != rank) throw Fail{2, "runner_spec.txt: malformed tensor line for " + t.name};
  return t;
}

Spec read_spec(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw Fail{2, path + ": cannot open (is this a crisp-edge ExecuTorch bundle?)"};
  Spec s;
  std::string line, head;
  std::getline(f, line);
  if (line != "crisp-edge-et-runner 1") throw Fail{2, path + ": not a crisp-edge runner spec (version 1)"};
  while (std::getline(f, line)) {
    std::istringstream ls(line);
    ls >> head;
    if (head == "mode") ls >> s.mode;
    else if (head == "tag") ls >> s.tag;
    else if (head == "classes") ls >> s.classes;
    else if (head == "input") s.inputs.push_back(read_tensor_spec(ls));
    else if (head == "set_task") s.set_task.push_back(read_tensor_spec(ls));
    else if (head == "output") { std::string n; ls >> n; s.outputs.push_back(n); }
  }
  return s;
}

// --- .npy (version 1.0, little-endian float32, C order) --------------------------------------
std::vector<float> read_npy(const std::string& path, const std::vector<int64_t>& want) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Fail{2, path + ": cannot open input"};
  char magic[8];
  f.read(magic, 8);
  if (!f || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw Fail{2, path + ": not a .npy file"};
  uint32_t hlen = 0;
  if (magic[6] == 1) { uint16_t h; f.read(reinterpret_cast<char*>(&h), 2); hlen = h; }
  else { f.read(reinterpret_cast<char*>(&hlen), 4); }
  if (!f || hlen > 65536) throw Fail{2, path + ": bad .npy header"};
  std::string header(hlen, '\0');
  f.read(&header[0], hlen);
  if (header.find("'descr': '<f4'") == std::string::npos) throw Fail{2, path + ": dtype must be float32 ('<f4')"};
  if (header.find("'fortran_order': False") == std::string::npos) throw Fail{2, path + ": must be C order"};
  auto a = header.find('('), b = header.find(')');
  std::vector<int64_t> shape;
  std::string dims = header.substr(a + 1, b - a - 1);
  for (char& c : dims) if (c == ',') c = ' ';
  std::istringstream ds(dims);
  int64_t d;
  while (ds >> d) shape.push_back(d);
  if (shape != want) throw Fail{2, path + ": shape " + shape_str(shape) + ", the program takes " + shape_str(want)};
  int64_t n = 1;
  for (auto x : shape) n *= x;
  std::vector<float> data(n);
  f.read(reinterpret_cast<char*>(data.data()), n * 4);
  if (f.gcount() != n * 4) throw Fail{2, path + ": truncated data"};
  return data;
}

void write_npy(const std::string& path, const float* data, const std::vector<int64_t>& shape) {
  std::string dims;
  for (auto d : shape) dims += std::to_string(d) + ",";
  if (shape.size() > 1) dims.pop_back();
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  while ((10 + header.size() + 1) % 64) header += ' ';
  header += '\n';
  std::ofstream f(path + ".tmp", std::ios::binary);
  f.write("\x93NUMPY\x01\x00", 8);
  uint16_t h = header.size();
  f.write(reinterpret_cast<const char*>(&h), 2);
  f << header;
  int64_t n = 1;
  for (auto d : shape) n *= d;
  f.write(reinterpret_cast<const char*>(data), n * 4);
  f.close();
  if (!f || std::rename((path + ".tmp").c_str(), path.c_str()) != 0) throw Fail{2, path + ": cannot write output"};
}

// --- task .ptd files ----------------------------------------------------------------------------
struct Ptd {
  std::unique_ptr<FileDataLoader> loader;
  std::optional<FlatTensorDataMap> map;
};

std::unique_ptr<Ptd> open_ptd(const std::string& path) {
  auto p = std::make_unique<Ptd>();
  auto loader = FileDataLoader::from(path.c_str());
  if (!loader.ok()) throw Fail{3, path + ": cannot open task file (error " + std::to_string((int)loader.error()) + ")"};
  p->loader = std::make_unique<FileDataLoader>(std::move(loader.get()));
  auto map = FlatTensorDataMap::load(p->loader.get());
  if (!map.ok()) throw Fail{3, path + ": not a readable .ptd file (damaged or truncated; error " +
                                   std::to_string((int)map.error()) + ")"};
  p->map.emplace(std::move(map.get()));
  return p;
}

// The tensor `key` of `ptd` as floats/int64 bytes, checked against its layout; nullopt when absent.
std::optional<std::vector<char>> get_tensor(Ptd& ptd, const std::string& key, ScalarType type,
                                            std::vector<int64_t>* shape, const std::string& where) {
  auto layout = ptd.map->get_tensor_layout(key.c_str());
  if (!layout.ok()) return std::nullopt;
  if (layout->scalar_type() != type) throw Fail{3, where + ": " + key + " has the wrong dtype"};
  shape->clear();
  for (auto d : layout->sizes()) shape->push_back(d);
  auto buf = ptd.map->get_data(key.c_str());
  if (!buf.ok()) throw Fail{3, where + ": " + key + " cannot be read (damaged file)"};
  if (buf->size() != layout->nbytes()) throw Fail{3, where + ": " + key + " holds the wrong number of bytes"};
  const char* d = static_cast<const char*>(buf->data());
  std::vector<char> out(d, d + buf->size());
  buf->Free();
  return out;
}

int64_t program_tag(Module& module) {
  auto r = module.execute("crisp_tag");
  if (!r.ok() || r->empty() || !(*r)[0].isInt()) throw Fail{4, "the program has no crisp_tag method: not a swappable crisp-edge program"};
  return (*r)[0].toInt();
}

// Reads, checks and applies a task; returns its class count (0: the exported head's).
int64_t set_task(Module& module, const Spec& spec, const std::string& path, Ptd& fallback, int64_t tag) {
  auto ptd = open_ptd(path);
  std::vector<int64_t> shape;
  auto t = get_tensor(*ptd, "crisp.tag", ScalarType::Long, &shape, path);
  if (!t || t->size() != 8) throw Fail{3, path + ": holds no crisp.tag tensor: not a crisp-edge task file"};
  int64_t file_tag;
  std::memcpy(&file_tag, t->data(), 8);
  if (file_tag != tag)
    throw Fail{3, path + ": made for other bases or another layout (tag " + std::to_string(file_tag) +
                      ", this program's " + std::to_string(tag) + "); refusing to run it"};
  std::vector<TensorPtr> keep;
  std::vector<EValue> inputs;
  int64_t classes = 0;
  for (const auto& in : spec.set_task) {
    auto data = get_tensor(*ptd, in.name, ScalarType::Float, &shape, path);
    bool head = in.name.rfind("head.", 0) == 0;
    if (!data) {
      if (!head) throw Fail{3, path + ": lacks " + in.name};
      data = get_tensor(fallback, in.name, ScalarType::Float, &shape, "default.ptd");
      if (!data) throw Fail{3, "default.ptd lacks " + in.name};
    }
    bool ok = shape.size() == in.shape.size();
    for (size_t i = 0; ok && i < shape.size(); ++i)
      ok = head && i == 0 ? (shape[0] >= 1 && shape[0] <= in.shape[0]) : shape[i] == in.shape[i];
    if (!ok) throw Fail{3, path + ": " + in.name + " has shape " + shape_str(shape) + ", the program takes " + shape_str(in.shape)};
    if (head) {
      if (classes && classes != shape[0]) throw Fail{3, path + ": head.weight and head.bias disagree on the class count"};
      classes = shape[0];
    }
    std::vector<float> full(in.numel(), 0.0f);  // zero-padded to the head capacity
    std::memcpy(full.data(), data->data(), data->size());
    std::vector<executorch::aten::SizesType> sizes(in.shape.begin(), in.shape.end());
    keep.push_back(make_tensor_ptr(sizes, std::move(full)));
    inputs.emplace_back(keep.back());
  }
  auto r = module.execute("set_task", inputs);
  if (!r.ok()) throw Fail{4, path + ": set_task failed (error " + std::to_string((int)r.error()) + ")"};
  return classes;
}

void run_cases(Module& module, const Spec& spec, const std::string& in_dir, const std::string& out_dir,
               const std::string& task, int cases, int64_t classes) {
  for (int i = 0; i < cases; ++i) {
    std::vector<TensorPtr> keep;
    std::vector<EValue> inputs;
    for (const auto& in : spec.inputs) {
      auto data = read_npy(in_dir + "/input." + std::to_string(i) + "." + in.name + ".npy", in.shape);
      std::vector<executorch::aten::SizesType> sizes(in.shape.begin(), in.shape.end());
      keep.push_back(make_tensor_ptr(sizes, std::move(data)));
      inputs.emplace_back(keep.back());
    }
    auto r = module.execute("forward", inputs);
    if (!r.ok()) throw Fail{4, "forward failed on case " + std::to_string(i) + " (error " + std::to_string((int)r.error()) + ")"};
    for (size_t k = 0; k < spec.outputs.size() && k < r->size(); ++k) {
      const auto& t = (*r)[k].toTensor();
      std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
      const float* src = t.const_data_ptr<float>();
      std::vector<float> out(src, src + t.numel());
      int64_t last = shape.back();
      if (classes > 0 && classes < last) {  // cut a padded head's logits to the task's classes
        int64_t rows = t.numel() / last;
        std::vector<float> cut(rows * classes);
        for (int64_t row = 0; row < rows; ++row)
          std::memcpy(&cut[row * classes], &out[row * last], classes * 4);
        out.swap(cut);
        shape.back() = classes;
      }
      write_npy(out_dir + "/output." + task + "." + std::to_string(i) + "." + spec.outputs[k] + ".npy", out.data(), shape);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 3) throw Fail{2, "usage: crisp_et_runner BUNDLE_DIR OUT_DIR --inputs IN_DIR --cases N [--task NAME=PATH.ptd ...]"};
    std::string bundle = argv[1], out_dir = argv[2], in_dir;
    int cases = -1;
    std::vector<std::pair<std::string, std::string>> tasks;
    for (int i = 3; i < argc; ++i) {
      std::string a = argv[i];
      if (i + 1 >= argc) throw Fail{2, "missing value after " + a};
      std::string v = argv[++i];
      if (a == "--inputs") in_dir = v;
      else if (a == "--cases") cases = std::atoi(v.c_str());
      else if (a == "--task") {
        auto eq = v.find('=');
        if (eq == std::string::npos || eq == 0) throw Fail{2, "--task takes NAME=PATH.ptd, got " + v};
        tasks.emplace_back(v.substr(0, eq), v.substr(eq + 1));
      } else throw Fail{2, "unknown argument " + a};
    }
    if (in_dir.empty() || cases < 0) throw Fail{2, "--inputs IN_DIR and --cases N are required"};
    Spec spec = read_spec(bundle + "/runner_spec.txt");
    Module module(bundle + "/model.pte", Module::LoadMode::File, nullptr, nullptr, nullptr, /*share_memory_arenas=*/true);
    Error err = module.load();
    if (err != Error::Ok) throw Fail{4, bundle + "/model.pte: cannot load the program (damaged or truncated; error " + std::to_string((int)err) + ")"};
    if (spec.mode != "swappable") {
      if (!tasks.empty()) throw Fail{2, "a " + spec.mode + " bundle has no tasks to switch"};
      run_cases(module, spec, in_dir, out_dir, "default", cases, 0);
      std::cout << "ran " << cases << " cases of a " << spec.mode << " bundle\n";
      return 0;
    }
    int64_t tag = program_tag(module);
    if (tag != spec.tag) throw Fail{4, "the program's crisp_tag differs from runner_spec.txt: files from different exports"};
    auto fallback = open_ptd(bundle + "/default.ptd");
    if (tasks.empty()) tasks.emplace_back("default", bundle + "/default.ptd");
    for (const auto& [name, path] : tasks) {
      int64_t classes = set_task(module, spec, path, *fallback, tag);
      run_cases(module, spec, in_dir, out_dir, name, cases, classes ? classes : spec.classes);
      std::cout << "task " << name << ": ran " << cases << " cases\n";
    }
    return 0;
  } catch (const Fail& f) {
    std::cerr << "crisp_et_runner: error: " << f.msg << "\n";
    return f.code;
  }
}
