// A small strict JSON reader (RFC 8259) for the bundle's manifest.json, bounded in every dimension:
// nesting depth, node count and string length; duplicate object keys, trailing commas, comments,
// control characters in strings, lone surrogates, leading zeros and trailing bytes are refused.
// NaN / Infinity / -Infinity are accepted as numbers because Python's json module writes them.
// Errors throw JsonError with the byte offset.
#pragma once

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace crisp {

struct JsonError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Json {
  enum Type { Null, Bool, Number, String, Array, Object } type = Null;
  bool b = false;
  double num = 0;
  bool is_int = false;  // a number written without fraction or exponent that fits int64
  int64_t i = 0;
  std::string s;
  std::vector<Json> a;
  std::vector<std::pair<std::string, Json>> o;  // in file order; keys are unique

  const Json* get(const std::string& key) const {
    for (const auto& kv : o)
      if (kv.first == key) return &kv.second;
    return nullptr;
  }
};

class JsonParser {
 public:
  static constexpr int kMaxDepth = 32;
  static constexpr size_t kMaxNodes = 1 << 20;
  static constexpr size_t kMaxString = 1 << 20;

  static Json parse(const std::string& text) {
    JsonParser p(text);
    p.ws();
    Json v = p.value(0);
    p.ws();
    if (p.pos_ != text.size()) p.fail("trailing bytes after the JSON value");
    return v;
  }

 private:
  explicit JsonParser(const std::string& t) : t_(t) {}

  [[noreturn]] void fail(const std::string& why) const {
    throw JsonError(why + " at byte " + std::to_string(pos_));
  }
  bool eof() const { return pos_ >= t_.size(); }
  char peek() const { return eof() ? '\0' : t_[pos_]; }
  void ws() {
    while (!eof() && (t_[pos_] == ' ' || t_[pos_] == '\t' || t_[pos_] == '\n' || t_[pos_] == '\r')) ++pos_;
  }
  bool lit(const char* w) {
    size_t n = std::char_traits<char>::length(w);
    if (t_.compare(pos_, n, w) == 0) {
      pos_ += n;
      return true;
    }
    return false;
  }

  Json value(int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth));
    if (++nodes_ > kMaxNodes) fail("more than " + std::to_string(kMaxNodes) + " values");
    Json v;
    char c = peek();
    if (c == '{') {
      v.type = Json::Object;
      ++pos_;
      ws();
      if (peek() == '}') { ++pos_; return v; }
      for (;;) {
        ws();
        if (peek() != '"') fail("expected a string key");
        std::string key = str();
        for (const auto& kv : v.o)
          if (kv.first == key) fail("duplicate key \"" + key.substr(0, 64) + "\"");
        ws();
        if (peek() != ':') fail("expected ':'");
        ++pos_;
        ws();
        v.o.emplace_back(std::move(key), value(depth + 1));
        ws();
        if (peek() == ',') { ++pos_; continue; }
        if (peek() == '}') { ++pos_; return v; }
        fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v.type = Json::Array;
      ++pos_;
      ws();
      if (peek() == ']') { ++pos_; return v; }
      for (;;) {
        ws();
        v.a.push_back(value(depth + 1));
        ws();
        if (peek() == ',') { ++pos_; continue; }
        if (peek() == ']') { ++pos_; return v; }
        fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v.type = Json::String;
      v.s = str();
      return v;
    }
    if (lit("true")) { v.type = Json::Bool; v.b = true; return v; }
    if (lit("false")) { v.type = Json::Bool; return v; }
    if (lit("null")) return v;
    if (lit("NaN")) { v.type = Json::Number; v.num = std::numeric_limits<double>::quiet_NaN(); return v; }
    if (lit("Infinity")) { v.type = Json::Number; v.num = HUGE_VAL; return v; }
    if (lit("-Infinity")) { v.type = Json::Number; v.num = -HUGE_VAL; return v; }
    if (c == '-' || (c >= '0' && c <= '9')) return number();
    fail("unexpected character");
  }

  Json number() {
    size_t start = pos_;
    bool integral = true;
    if (peek() == '-') ++pos_;
    if (peek() == '0') {
      ++pos_;
    } else if (peek() >= '1' && peek() <= '9') {
      while (peek() >= '0' && peek() <= '9') ++pos_;
    } else {
      fail("malformed number");
    }
    if (peek() == '.') {
      integral = false;
      ++pos_;
      if (!(peek() >= '0' && peek() <= '9')) fail("malformed number");
      while (peek() >= '0' && peek() <= '9') ++pos_;
    }
    if (peek() == 'e' || peek() == 'E') {
      integral = false;
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (!(peek() >= '0' && peek() <= '9')) fail("malformed number");
      while (peek() >= '0' && peek() <= '9') ++pos_;
    }
    std::string text = t_.substr(start, pos_ - start);
    if (text.size() > 64) fail("number longer than 64 characters");
    Json v;
    v.type = Json::Number;
    v.num = std::strtod(text.c_str(), nullptr);
    if (integral) {
      errno = 0;
      char* end = nullptr;
      long long x = std::strtoll(text.c_str(), &end, 10);
      if (errno == 0 && end && *end == '\0') {
        v.is_int = true;
        v.i = x;
      }
    }
    return v;
  }

  static void utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }

  uint32_t hex4() {
    if (pos_ + 4 > t_.size()) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char h = t_[pos_++];
      v <<= 4;
      if (h >= '0' && h <= '9') v |= h - '0';
      else if (h >= 'a' && h <= 'f') v |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') v |= h - 'A' + 10;
      else fail("bad \\u escape");
    }
    return v;
  }

  // Validates one UTF-8 sequence starting at pos_ (strict: no overlongs, no surrogates) and copies it.
  void utf8_copy(std::string& out) {
    unsigned char c0 = static_cast<unsigned char>(t_[pos_]);
    int n = c0 < 0x80 ? 1 : (c0 >> 5) == 6 ? 2 : (c0 >> 4) == 14 ? 3 : (c0 >> 3) == 30 ? 4 : 0;
    if (!n || pos_ + n > t_.size()) fail("invalid UTF-8");
    uint32_t cp = n == 1 ? c0 : n == 2 ? (c0 & 0x1F) : n == 3 ? (c0 & 0x0F) : (c0 & 0x07);
    for (int k = 1; k < n; ++k) {
      unsigned char c = static_cast<unsigned char>(t_[pos_ + k]);
      if ((c >> 6) != 2) fail("invalid UTF-8");
      cp = (cp << 6) | (c & 0x3F);
    }
    static const uint32_t min[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) fail("invalid UTF-8");
    out.append(t_, pos_, n);
    pos_ += n;
  }

  std::string str() {
    ++pos_;  // the opening quote
    std::string out;
    for (;;) {
      if (eof()) fail("unterminated string");
      if (out.size() > kMaxString) fail("string longer than " + std::to_string(kMaxString) + " bytes");
      char c = t_[pos_];
      if (c == '"') { ++pos_; return out; }
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string");
      if (c != '\\') { utf8_copy(out); continue; }
      ++pos_;
      if (eof()) fail("unterminated escape");
      char e = t_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (!lit("\\u")) fail("lone surrogate in \\u escape");
            uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("lone surrogate in \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("lone surrogate in \\u escape");
          }
          utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
  }

  const std::string& t_;
  size_t pos_ = 0;
  size_t nodes_ = 0;
};

}  // namespace crisp
