#include "jinja.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <map>
#include <optional>

#include "multipole/multipole.h"

namespace mp::jinja {

using json = nlohmann::json;

namespace {

[[noreturn]] void fail(int line, const std::string& msg) {
  throw Error("chat template, line " + std::to_string(line) + ": " + msg);
}

// Limits that keep a hostile template or conversation from taking the process's memory, stack
// or time (tests/fuzz/fuzz_chat.cpp), far above what real templates need; the steps are
// render()'s argument.
constexpr size_t kMaxBytes = size_t(64) << 20;  // any string, the output included
constexpr int kMaxNesting = 256;                // expressions and blocks

// A double as an integer, refused where it would not fit (the cast would be undefined).
long long to_integer(double d, int line) {
  if (!(d >= -9.2233720368547758e18 && d < 9.2233720368547758e18))
    fail(line, "the number does not fit a 64-bit integer");
  return static_cast<long long>(d);
}

// Python's ints do not overflow; here the operation is refused instead.
long long checked(char op, long long a, long long b, int line) {
  long long r = 0;
  const bool over = op == '+'   ? __builtin_add_overflow(a, b, &r)
                    : op == '-' ? __builtin_sub_overflow(a, b, &r)
                                : __builtin_mul_overflow(a, b, &r);
  if (over) fail(line, "integer overflow");
  return r;
}

// Refuses a string about to grow past kMaxBytes.
void check_size(size_t bytes, int line) {
  if (bytes > kMaxBytes) fail(line, "a string would exceed " + std::to_string(kMaxBytes >> 20) + " MiB");
}

// Counts nesting depth (recursion of the parsers); refuses it past kMaxNesting.
struct Nesting {
  int& depth;
  Nesting(int& d, int line) : depth(d) {
    if (++depth > kMaxNesting) fail(line, "nested too deeply");
  }
  ~Nesting() { --depth; }
};

// Jinja's Undefined: a missing variable, attribute or key. Renders as "", is falsy, and is
// what `is defined` tests.
json undefined() { return json(json::value_t::discarded); }
bool is_undefined(const json& v) { return v.is_discarded(); }

// --- Expression tokens -------------------------------------------------------------------------

struct Token {
  enum Kind { Name, Str, Int, Float, Op, End } kind = End;
  std::string text;  // name, operator or the decoded string
  double num = 0;
  long long inum = 0;
  int line = 0;
};

bool is_name_start(char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_'; }
bool is_name_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

// Tokenizes the inside of a {{ }} or {% %} tag from `pos` up to its closing `close` ("}}" or
// "%}", optionally preceded by '-' or '+'). Returns the tokens; pos is left after the closer and
// `strip_after` tells whether it was "-}}"/"-%}" and `keep_after` whether it was "+%}".
std::vector<Token> tokenize_tag(std::string_view s, size_t& pos, std::string_view close, int& line,
                                bool& strip_after, bool& keep_after) {
  std::vector<Token> out;
  strip_after = keep_after = false;
  const int start_line = line;
  while (true) {
    while (pos < s.size() && std::isspace(static_cast<unsigned char>(s[pos]))) {
      if (s[pos] == '\n') ++line;
      ++pos;
    }
    if (pos >= s.size())
      fail(start_line, "the tag is not closed with '" + std::string(close) + "'");
    if ((s[pos] == '-' || s[pos] == '+') && s.substr(pos + 1, close.size()) == close) {
      strip_after = s[pos] == '-';
      keep_after = s[pos] == '+';
      pos += 1 + close.size();
      break;
    }
    if (s.substr(pos, close.size()) == close) {
      pos += close.size();
      break;
    }
    Token t;
    t.line = line;
    const char c = s[pos];
    if (is_name_start(c)) {
      const size_t b = pos;
      while (pos < s.size() && is_name_char(s[pos])) ++pos;
      t.kind = Token::Name;
      t.text = std::string(s.substr(b, pos - b));
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      const size_t b = pos;
      while (pos < s.size() && (std::isdigit(static_cast<unsigned char>(s[pos])) || s[pos] == '_'))
        ++pos;
      bool real = false;
      if (pos + 1 < s.size() && s[pos] == '.' &&
          std::isdigit(static_cast<unsigned char>(s[pos + 1]))) {
        real = true;
        ++pos;
        while (pos < s.size() && std::isdigit(static_cast<unsigned char>(s[pos]))) ++pos;
      }
      std::string digits(s.substr(b, pos - b));
      std::erase(digits, '_');
      t.kind = real ? Token::Float : Token::Int;
      try {
        t.num = std::stod(digits);
        t.inum = real ? 0 : std::stoll(digits);
      } catch (const std::out_of_range&) {
        fail(line, "the number " + digits + " is out of range");
      }
    } else if (c == '\'' || c == '"') {
      ++pos;
      t.kind = Token::Str;
      while (true) {
        if (pos >= s.size()) fail(t.line, "a string literal is not closed");
        const char d = s[pos++];
        if (d == c) break;
        if (d == '\n') ++line;
        if (d != '\\') {
          t.text += d;
          continue;
        }
        if (pos >= s.size()) fail(t.line, "a string literal is not closed");
        const char e = s[pos++];
        static constexpr std::string_view kFrom = "ntr\\'\"", kTo = "\n\t\r\\'\"";
        if (const size_t k = kFrom.find(e); k != std::string_view::npos) {
          t.text += kTo[k];
        } else {  // Python keeps unknown escapes as written
          t.text += '\\';
          t.text += e;
        }
      }
    } else {
      static const char* two[] = {"==", "!=", "<=", ">=", "//", "**"};
      t.kind = Token::Op;
      for (const char* op : two)
        if (s.substr(pos, 2) == op) t.text = op;
      if (t.text.empty()) {
        if (std::string_view("+-*/%~|.,:()[]{}=<>").find(c) == std::string_view::npos)
          fail(line, std::string("unexpected character '") + c + "'");
        t.text = std::string(1, c);
      }
      pos += t.text.size();
    }
    out.push_back(std::move(t));
  }
  Token end;
  end.line = line;
  out.push_back(end);
  return out;
}

// --- Expressions -------------------------------------------------------------------------------

struct Expr {
  enum Kind { Lit, Var, Attr, Index, Slice, Call, Filter, Test, Not, Neg, Bin, Cond, List, Dict };
  Kind kind;
  int line = 0;
  json value;                               // Lit
  std::string name;                         // Var, Attr, Call (method), Filter, Test, Bin (op)
  std::vector<std::unique_ptr<Expr>> kids;  // operands, then positional arguments
  std::vector<std::string> kwnames;         // keyword arguments: the last kwnames.size() kids
  bool negated = false;                     // Test: "is not"
};
using ExprP = std::unique_ptr<Expr>;

// A new expression or statement node.
template <class T>
std::unique_ptr<T> make(typename T::Kind k, int line) {
  auto n = std::make_unique<T>();
  n->kind = k;
  n->line = line;
  return n;
}

class ExprParser {
 public:
  explicit ExprParser(std::vector<Token> t) : t_(std::move(t)) {}
  const Token& peek(size_t k = 0) const { return t_[std::min(i_ + k, t_.size() - 1)]; }
  bool at_end() const { return peek().kind == Token::End; }
  bool is_op(const char* op, size_t k = 0) const {
    return peek(k).kind == Token::Op && peek(k).text == op;
  }
  bool is_name(const char* n, size_t k = 0) const {
    return peek(k).kind == Token::Name && peek(k).text == n;
  }
  Token next() { return t_[std::min(i_++, t_.size() - 1)]; }
  void expect_op(const char* op) {
    if (!is_op(op)) fail(peek().line, std::string("expected '") + op + "', found " + describe());
    ++i_;
  }
  std::string name() {
    if (peek().kind != Token::Name) fail(peek().line, "expected a name, found " + describe());
    return next().text;
  }
  void expect_name(const char* n) {
    if (!is_name(n)) fail(peek().line, std::string("expected '") + n + "', found " + describe());
    ++i_;
  }
  void expect_end() {
    if (!at_end()) fail(peek().line, "unexpected " + describe());
  }
  std::string describe() const {
    const Token& t = peek();
    if (t.kind == Token::End) return "the end of the tag";
    if (t.kind == Token::Str) return "a string";
    return "'" + (t.kind == Token::Int || t.kind == Token::Float ? std::to_string(t.num) : t.text) +
           "'";
  }

  // expression := or ["if" or ["else" expression]]
  ExprP expression() {
    const Nesting n(depth_, peek().line);
    ExprP e = or_expr();
    if (is_name("if")) {
      const int line = next().line;
      auto c = make<Expr>(Expr::Cond, line);
      c->kids.push_back(std::move(e));
      c->kids.push_back(or_expr());
      if (is_name("else")) {
        ++i_;
        c->kids.push_back(expression());
      } else {
        auto u = make<Expr>(Expr::Lit, line);
        u->value = undefined();
        c->kids.push_back(std::move(u));
      }
      return c;
    }
    return e;
  }
  ExprP or_expr() { return binary(0); }
  ExprP not_expr() {
    const Nesting n(depth_, peek().line);
    if (is_name("not")) {
      auto e = make<Expr>(Expr::Not, next().line);
      e->kids.push_back(not_expr());
      return e;
    }
    return compare();
  }
  ExprP compare() {
    ExprP e = binary(kConcat);
    while (true) {
      std::string op;
      if (peek().kind == Token::Op &&
          (peek().text == "==" || peek().text == "!=" || peek().text == "<" || peek().text == ">" ||
           peek().text == "<=" || peek().text == ">="))
        op = peek().text, ++i_;
      else if (is_name("in"))
        op = "in", ++i_;
      else if (is_name("not") && is_name("in", 1))
        op = "not in", i_ += 2;
      else
        return e;
      auto b = make<Expr>(Expr::Bin, peek().line);
      b->name = op;
      b->kids.push_back(std::move(e));
      b->kids.push_back(binary(kConcat));
      e = std::move(b);
    }
  }
  ExprP unary() {
    const Nesting n(depth_, peek().line);
    if (is_op("-")) {
      auto e = make<Expr>(Expr::Neg, next().line);
      e->kids.push_back(unary());
      return e;
    }
    if (is_op("+")) ++i_;
    return filtered(postfix(primary()));
  }
  // Left-associative binary operators by precedence, loosest first; "not" and the comparisons
  // (not_expr, compare) sit between "and" and "~".
  static constexpr size_t kNot = 2, kConcat = 3;
  ExprP binary(size_t level) {
    static const std::vector<std::vector<std::string>> kLevels = {
        {"or"}, {"and"}, {}, {"~"}, {"+", "-"}, {"*", "/", "//", "%"}, {"**"}};
    if (level == kLevels.size()) return unary();
    if (level == kNot) return not_expr();
    ExprP e = binary(level + 1);
    while (true) {
      const auto& ops = kLevels[level];
      const auto hit = std::find_if(ops.begin(), ops.end(), [&](const std::string& op) {
        return is_op(op.c_str()) || is_name(op.c_str());
      });
      if (hit == ops.end()) return e;
      auto b = make<Expr>(Expr::Bin, next().line);
      b->name = *hit;
      b->kids.push_back(std::move(e));
      b->kids.push_back(binary(level + 1));
      e = std::move(b);
    }
  }
  // Call arguments after '(' up to ')': positional, then name=value.
  void arguments(Expr& e) {
    std::vector<ExprP> kw;
    while (!is_op(")")) {
      if (peek().kind == Token::Name && is_op("=", 1)) {
        e.kwnames.push_back(next().text);
        ++i_;
        kw.push_back(expression());
      } else {
        if (!kw.empty()) fail(peek().line, "a positional argument follows a keyword argument");
        e.kids.push_back(expression());
      }
      if (!is_op(",")) break;
      ++i_;
    }
    expect_op(")");
    for (auto& k : kw) e.kids.push_back(std::move(k));
  }
  // After '.' or '|': a node of kind k, named by the name that follows, over `operand`.
  ExprP named(Expr::Kind k, ExprP operand) {
    auto n = make<Expr>(k, next().line);
    n->name = name();
    n->kids.push_back(std::move(operand));
    return n;
  }
  ExprP postfix(ExprP e) {
    while (true) {
      if (is_op(".")) {
        e = named(Expr::Attr, std::move(e));
      } else if (is_op("[")) {
        const int line = next().line;
        ExprP parts[3];
        int n = 0;
        bool slice = false;
        while (true) {
          if (!is_op(":") && !is_op("]")) parts[n] = expression();
          if (is_op(":") && n < 2) {
            slice = true;
            ++n;
            ++i_;
            continue;
          }
          break;
        }
        expect_op("]");
        auto x = make<Expr>(slice ? Expr::Slice : Expr::Index, line);
        x->kids.push_back(std::move(e));
        if (!slice && !parts[0]) fail(line, "empty subscript");
        for (int k = 0; k < (slice ? 3 : 1); ++k) x->kids.push_back(std::move(parts[k]));
        e = std::move(x);
      } else if (is_op("(")) {
        const int line = next().line;
        auto c = make<Expr>(Expr::Call, line);
        c->kids.push_back(std::move(e));
        arguments(*c);
        e = std::move(c);
      } else {
        return e;
      }
    }
  }
  // Filters (x | f(args)) and tests (x is [not] t(args)), left to right.
  ExprP filtered(ExprP e) {
    while (true) {
      if (is_op("|")) {
        auto f = named(Expr::Filter, std::move(e));
        if (is_op("(")) {
          ++i_;
          arguments(*f);
        }
        e = std::move(f);
      } else if (is_name("is")) {
        const int line = next().line;
        auto t = make<Expr>(Expr::Test, line);
        if (is_name("not")) {
          t->negated = true;
          ++i_;
        }
        // "none", "true" and "false" are test names here, not literals.
        t->name = name();
        t->kids.push_back(std::move(e));
        if (is_op("(")) {
          ++i_;
          arguments(*t);
        } else if (peek().kind == Token::Str || peek().kind == Token::Int ||
                   peek().kind == Token::Float ||
                   (peek().kind == Token::Name && !is_name("and") && !is_name("or") &&
                    !is_name("else") && !is_name("if") && !is_name("in") && !is_name("not") &&
                    !is_name("is"))) {
          t->kids.push_back(primary());  // "x is equalto 3", "x is sameas y"
        }
        e = std::move(t);
      } else {
        return e;
      }
    }
  }
  ExprP primary() {
    const Token t = next();
    auto lit = [&](json v) {
      auto e = make<Expr>(Expr::Lit, t.line);
      e->value = std::move(v);
      return e;
    };
    switch (t.kind) {
      case Token::Str: {
        std::string s = t.text;
        while (peek().kind == Token::Str) s += next().text;  // "a" "b" concatenates
        return lit(s);
      }
      case Token::Int:
        return lit(t.inum);
      case Token::Float:
        return lit(t.num);
      case Token::Name:
        if (t.text == "true" || t.text == "True") return lit(true);
        if (t.text == "false" || t.text == "False") return lit(false);
        if (t.text == "none" || t.text == "None") return lit(nullptr);
        {
          auto v = make<Expr>(Expr::Var, t.line);
          v->name = t.text;
          return v;
        }
      case Token::Op:
        if (t.text == "(") {
          ExprP e = expression();
          if (is_op(",")) {  // a tuple: a list here
            auto l = make<Expr>(Expr::List, t.line);
            l->kids.push_back(std::move(e));
            while (is_op(",")) {
              ++i_;
              if (is_op(")")) break;
              l->kids.push_back(expression());
            }
            e = std::move(l);
          }
          expect_op(")");
          return e;
        }
        if (t.text == "[" || t.text == "{") {
          const bool list = t.text == "[";
          auto l = make<Expr>(list ? Expr::List : Expr::Dict, t.line);
          while (!is_op(list ? "]" : "}")) {  // a trailing comma is allowed
            l->kids.push_back(expression());
            if (!list) {
              expect_op(":");
              l->kids.push_back(expression());
            }
            if (!is_op(",")) break;
            ++i_;
          }
          expect_op(list ? "]" : "}");
          return l;
        }
        [[fallthrough]];
      default:
        --i_;
        fail(t.line, "expected a value, found " + describe());
    }
  }

 private:
  std::vector<Token> t_;
  size_t i_ = 0;
  int depth_ = 0;
};

// Python strings are code points: slices, indices, lengths and case count characters.
std::u32string chars(const std::string& s) {
  std::u32string out;
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (len == 0 || i + len > s.size()) {  // not UTF-8: U+FFFD, as Python's decoding would
      out += U'\xFFFD';
      ++i;
      continue;
    }
    char32_t cp = len == 1 ? c : c & (0x7F >> len);
    for (int k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    out += cp;
    i += size_t(len);
  }
  return out;
}
std::string utf8(const std::u32string& cps) {
  std::string out;
  for (char32_t cp : cps) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  return out;
}
std::string utf8(char32_t cp) { return utf8(std::u32string(1, cp)); }

// Case mapping of ASCII, Latin-1, Greek and basic Cyrillic letters (other scripts unchanged).
char32_t to_upper(char32_t c) {
  if ((c >= 'a' && c <= 'z') || (c >= 0xE0 && c <= 0xFE && c != 0xF7) ||
      (c >= 0x3B1 && c <= 0x3C9 && c != 0x3C2) || (c >= 0x430 && c <= 0x44F))
    return c - 32;
  if (c >= 0x450 && c <= 0x45F) return c - 80;
  return c;
}
char32_t to_lower(char32_t c) {
  if ((c >= 'A' && c <= 'Z') || (c >= 0xC0 && c <= 0xDE && c != 0xD7) ||
      (c >= 0x391 && c <= 0x3A9 && c != 0x3A2) || (c >= 0x410 && c <= 0x42F))
    return c + 32;
  if (c >= 0x400 && c <= 0x40F) return c + 80;
  return c;
}
bool is_letter_or_digit(char32_t c) { return to_upper(c) != to_lower(c) || (c >= '0' && c <= '9'); }

std::string upper(const std::string& s) {
  std::u32string c = chars(s);
  for (auto& x : c) x = to_upper(x);
  return utf8(c);
}
std::string lower(const std::string& s) {
  std::u32string c = chars(s);
  for (auto& x : c) x = to_lower(x);
  return utf8(c);
}
std::string capitalize(const std::string& s) {
  std::u32string c = chars(s);
  for (size_t i = 0; i < c.size(); ++i) c[i] = i ? to_lower(c[i]) : to_upper(c[i]);
  return utf8(c);
}
std::string title(const std::string& s) {
  std::u32string c = chars(s);
  bool start = true;
  for (auto& x : c) {
    x = start ? to_upper(x) : to_lower(x);
    start = !is_letter_or_digit(x);
  }
  return utf8(c);
}

// --- Values ------------------------------------------------------------------------------------

bool truthy(const json& v) {
  if (is_undefined(v) || v.is_null()) return false;
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_number_integer()) return v.get<long long>() != 0;
  if (v.is_number()) return v.get<double>() != 0;
  if (v.is_string()) return !v.get_ref<const std::string&>().empty();  // json::empty() is false
  if (v.is_array() || v.is_object()) return !v.empty();
  return true;
}

std::string type_name(const json& v) {
  if (is_undefined(v)) return "undefined";
  if (v.is_null()) return "none";
  if (v.is_boolean()) return "boolean";
  if (v.is_number()) return "number";
  if (v.is_string()) return "string";
  if (v.is_array()) return "list";
  return "mapping";
}

std::string py_float(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[32];
  for (int prec = 1; prec <= 17; ++prec) {  // shortest repr that reads back, as Python's repr
    std::snprintf(buf, sizeof buf, "%.*g", prec, d);
    if (std::stod(buf) == d) break;
  }
  std::string s = buf;
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

// Python's json.dumps (ensure_ascii=False): ", " and ": " separators without indent; with one,
// "," and ": " and newlines. Keys in their order (nlohmann::ordered_json is not used, so sorted).
void dump_json(const json& v, int indent, int depth, std::string& out) {
  if (v.is_object() || v.is_array()) {
    if (v.empty()) {
      out += v.is_object() ? "{}" : "[]";
      return;
    }
    out += v.is_object() ? '{' : '[';
    bool first = true;
    auto nl = [&](int d) {
      if (indent < 0) return;
      if (out.size() + size_t(indent) * size_t(d) > kMaxBytes)
        throw Error("chat template: tojson output exceeds " + std::to_string(kMaxBytes >> 20) +
                    " MiB");
      out += "\n" + std::string(size_t(indent) * d, ' ');
    };
    for (auto it = v.begin(); it != v.end(); ++it) {
      if (!first) out += indent >= 0 ? "," : ", ";
      first = false;
      nl(depth + 1);
      if (v.is_object()) {
        out += json(it.key()).dump(-1, ' ', false, json::error_handler_t::replace);
        out += ": ";
      }
      dump_json(*it, indent, depth + 1, out);
    }
    nl(depth);
    out += v.is_object() ? '}' : ']';
  } else if (v.is_number_float()) {
    out += py_float(v.get<double>());
  } else if (is_undefined(v)) {
    out += "null";
  } else {
    out += v.dump(-1, ' ', false, json::error_handler_t::replace);
  }
}

// How {{ v }} prints: Python's str().
std::string to_str(const json& v);
std::string repr(const json& v) {
  if (v.is_string()) {
    const std::string s = v.get<std::string>();
    const char q =
        s.find('\'') != std::string::npos && s.find('"') == std::string::npos ? '"' : '\'';
    std::string o(1, q);
    for (char c : s) {
      if (c == q || c == '\\') o += '\\';
      if (c == '\n')
        o += "\\n";
      else
        o += c;
    }
    return o + q;
  }
  if (v.is_array()) {
    std::string o = "[";
    for (size_t i = 0; i < v.size(); ++i) o += (i ? ", " : "") + repr(v[i]);
    return o + "]";
  }
  if (v.is_object()) {
    std::string o = "{";
    bool first = true;
    for (auto it = v.begin(); it != v.end(); ++it) {
      o += (first ? "" : ", ") + repr(json(it.key())) + ": " + repr(*it);
      first = false;
    }
    return o + "}";
  }
  return to_str(v);
}
std::string to_str(const json& v) {
  if (is_undefined(v)) return "";
  if (v.is_string()) return v.get<std::string>();
  if (v.is_null()) return "None";
  if (v.is_boolean()) return v.get<bool>() ? "True" : "False";
  if (v.is_number_integer()) return std::to_string(v.get<long long>());
  if (v.is_number_float()) return py_float(v.get<double>());
  return repr(v);
}

bool equal(const json& a, const json& b) {
  if (is_undefined(a) || is_undefined(b)) return is_undefined(a) && is_undefined(b);
  if (a.is_number() && b.is_number()) return a.get<double>() == b.get<double>();
  return a == b;
}

// Python's slice semantics, negative indices and steps included.
json slice(const json& v, const json& a, const json& b, const json& c, int line) {
  const bool str = v.is_string();
  if (!str && !v.is_array()) fail(line, "cannot slice a " + type_name(v));
  const std::u32string cps = str ? chars(v.get<std::string>()) : std::u32string();
  const long long n = static_cast<long long>(str ? cps.size() : v.size());
  auto num = [&](const json& x) -> std::optional<long long> {
    if (is_undefined(x) || x.is_null()) return std::nullopt;
    if (!x.is_number_integer()) fail(line, "slice indices must be integers");
    return x.get<long long>();
  };
  const long long step = num(c).value_or(1);
  if (step == 0) fail(line, "slice step cannot be zero");
  auto clamp = [&](std::optional<long long> x, long long def) {
    if (!x) return def;
    long long i = *x < 0 ? *x + n : *x;
    return step > 0 ? std::clamp(i, 0LL, n) : std::clamp(i, -1LL, n - 1);
  };
  const long long lo = clamp(num(a), step > 0 ? 0 : n - 1), hi = clamp(num(b), step > 0 ? n : -1);
  json out = json::array();
  std::u32string s;
  for (__int128 i = lo; step > 0 ? i < hi : i > hi; i += step) {  // (128 bits: no overflow)
    if (str)
      s += cps[size_t(i)];
    else
      out.push_back(v[size_t(i)]);
  }
  return str ? json(utf8(s)) : out;
}

std::string strip(const std::string& s, const std::string& chars, bool left, bool right) {
  size_t b = 0, e = s.size();
  while (left && b < e && chars.find(s[b]) != std::string::npos) ++b;
  while (right && e > b && chars.find(s[e - 1]) != std::string::npos) --e;
  return s.substr(b, e - b);
}
const std::string kSpace = " \t\n\r\f\v";

// Built anew, not replaced in place: linear in the text whatever the number of matches.
std::string replace_all(const std::string& s, const std::string& from, const std::string& to,
                        int line) {
  if (from.empty()) return s;
  std::string out;
  size_t done = 0;
  for (size_t at; (at = s.find(from, done)) != std::string::npos; done = at + from.size()) {
    check_size(out.size() + (at - done) + to.size(), line);
    out.append(s, done, at - done).append(to);
  }
  check_size(out.size() + s.size() - done, line);
  return out.append(s, done);
}

// --- Statements --------------------------------------------------------------------------------

enum class Flow { Normal, Break, Continue };

}  // namespace

struct Template::Node {
  enum Kind { Seq, Text, Out, If, For, Set, Break, Continue } kind = Seq;
  int line = 0;
  std::string text;               // Text; Set: variable name
  std::string attr;               // Set: "ns.attr" target's attribute
  std::vector<std::string> vars;  // For: loop variables
  std::vector<ExprP> exprs;       // Out/Set: value; If: conditions; For: iterable
  std::vector<std::unique_ptr<Node>>
      kids;  // Seq: body; If: branch bodies (+ else); For: body, else
};

namespace {

using Node = Template::Node;
using NodeP = std::unique_ptr<Node>;

// The template cut into text and tags, whitespace control applied.
struct Piece {
  enum Kind { Text, Out, Stmt } kind;
  std::string text;
  std::vector<Token> tokens;
  int line;
};

std::vector<Piece> lex(std::string_view s) {
  std::vector<Piece> out;
  size_t pos = 0;
  int line = 1;
  bool line_start = true;   // the text begins a line (template start, or after "\n")
  bool strip_next = false;  // the previous tag ended with '-'
  bool trim_next = false;   // the previous block tag ended plainly (trim_blocks)
  while (pos <= s.size()) {
    size_t at = pos;
    while ((at = s.find('{', at)) != std::string_view::npos && at + 1 < s.size() &&
           s[at + 1] != '{' && s[at + 1] != '%' && s[at + 1] != '#')
      ++at;
    if (at != std::string_view::npos && at + 1 >= s.size()) at = std::string_view::npos;
    std::string text(s.substr(pos, at == std::string_view::npos ? s.npos : at - pos));
    if (strip_next) {
      const size_t b = text.find_first_not_of(kSpace);
      text = b == std::string::npos ? "" : text.substr(b);
    } else if (trim_next && !text.empty() && text[0] == '\n') {
      text.erase(0, 1);
    }
    const int text_line = line;
    for (char c : s.substr(pos, at == std::string_view::npos ? s.npos : at - pos))
      line += c == '\n';
    if (at == std::string_view::npos) {
      if (!text.empty() && text.back() == '\n') text.pop_back();  // keep_trailing_newline off
      if (!text.empty()) out.push_back({Piece::Text, text, {}, text_line});
      break;
    }
    const char kind = s[at + 1];
    size_t p = at + 2;
    const char sign = p < s.size() && (s[p] == '-' || s[p] == '+') ? s[p] : 0;
    if (sign) ++p;
    if (sign == '-') {
      text = strip(text, kSpace, false, true);
    } else if (sign != '+' && kind != '{') {  // lstrip_blocks: blocks and comments only
      const size_t nl = text.rfind('\n');
      const size_t from = nl == std::string::npos ? 0 : nl + 1;
      if ((nl != std::string::npos || line_start) &&
          text.find_first_not_of(kSpace, from) == std::string::npos)
        text.erase(from);
    }
    if (!text.empty()) out.push_back({Piece::Text, text, {}, text_line});
    const int tag_line = line;
    bool strip_after = false, keep_after = false;
    if (kind == '#') {
      const size_t end = s.find("#}", p);
      if (end == std::string_view::npos) fail(line, "a comment is not closed with '#}'");
      for (char c : s.substr(p, end - p)) line += c == '\n';
      strip_after = end > p && s[end - 1] == '-';
      keep_after = end > p && s[end - 1] == '+';
      pos = end + 2;
    } else {
      auto tokens = tokenize_tag(s, p, kind == '{' ? "}}" : "%}", line, strip_after, keep_after);
      out.push_back({kind == '{' ? Piece::Out : Piece::Stmt, "", std::move(tokens), tag_line});
      pos = p;
    }
    strip_next = strip_after;
    trim_next = kind != '{' && !keep_after && !strip_after;
    // Jinja's line_starting: the tag (and what it swallowed) ended a line.
    size_t after = pos;
    if (strip_next)
      while (after < s.size() && kSpace.find(s[after]) != std::string::npos) ++after;
    else if (trim_next && after < s.size() && s[after] == '\n')
      ++after;
    line_start = after > 0 && s[after - 1] == '\n';
  }
  return out;
}

class StmtParser {
 public:
  explicit StmtParser(std::vector<Piece> p) : p_(std::move(p)) {}

  // Parses pieces into `into` until a statement whose keyword is in `stops`; returns that keyword
  // (its parser positioned after the keyword) or "" at the end.
  std::string body(Node& into, std::initializer_list<const char*> stops, ExprParser** stopper) {
    const Nesting nest(depth_, i_ < p_.size() ? p_[i_].line : 0);
    while (i_ < p_.size()) {
      Piece& pc = p_[i_++];
      if (pc.kind == Piece::Text) {
        auto n = make<Node>(Node::Text, pc.line);
        n->text = pc.text;
        into.kids.push_back(std::move(n));
        continue;
      }
      parsers_.push_back(std::make_unique<ExprParser>(std::move(pc.tokens)));
      ExprParser& ep = *parsers_.back();
      if (pc.kind == Piece::Out) {
        auto n = make<Node>(Node::Out, pc.line);
        n->exprs.push_back(ep.expression());
        ep.expect_end();
        into.kids.push_back(std::move(n));
        continue;
      }
      const std::string kw = ep.name();
      for (const char* s : stops)
        if (kw == s) {
          *stopper = &ep;
          return kw;
        }
      if (kw == "if") {
        into.kids.push_back(if_stmt(ep, pc.line));
      } else if (kw == "for") {
        into.kids.push_back(for_stmt(ep, pc.line));
      } else if (kw == "set") {
        auto n = make<Node>(Node::Set, pc.line);
        n->text = ep.name();
        if (ep.is_op(".")) {
          ep.next();
          n->attr = ep.name();
        }
        if (!ep.is_op("="))
          fail(pc.line, "only '{% set name = value %}' is supported (no block set)");
        ep.next();
        n->exprs.push_back(ep.expression());
        ep.expect_end();
        into.kids.push_back(std::move(n));
      } else if (kw == "break" || kw == "continue") {
        ep.expect_end();
        into.kids.push_back(make<Node>(kw == "break" ? Node::Break : Node::Continue, pc.line));
      } else if (kw == "generation") {  // transformers' assistant-mask marker: renders its body
        ep.expect_end();
        auto n = make<Node>(Node::Seq, pc.line);
        ExprParser* end = nullptr;
        if (body(*n, {"endgeneration"}, &end) != "endgeneration")
          fail(pc.line, "'generation' is not closed by 'endgeneration'");
        end->expect_end();
        into.kids.push_back(std::move(n));
      } else {
        fail(pc.line, "unsupported or unexpected tag '" + kw + "'");
      }
    }
    return "";
  }

  NodeP if_stmt(ExprParser& ep, int line) {
    auto n = make<Node>(Node::If, line);
    ExprParser* cur = &ep;
    while (true) {
      n->exprs.push_back(cur->expression());
      cur->expect_end();
      auto branch = make<Node>(Node::Seq, line);
      ExprParser* stop = nullptr;
      const std::string kw = body(*branch, {"elif", "else", "endif"}, &stop);
      n->kids.push_back(std::move(branch));
      if (kw == "elif") {
        cur = stop;
        continue;
      }
      if (kw == "else") {
        stop->expect_end();
        auto other = make<Node>(Node::Seq, line);
        ExprParser* end = nullptr;
        if (body(*other, {"endif"}, &end) != "endif") fail(line, "'if' is not closed by 'endif'");
        end->expect_end();
        n->kids.push_back(std::move(other));
        return n;
      }
      if (kw != "endif") fail(line, "'if' is not closed by 'endif'");
      stop->expect_end();
      return n;
    }
  }

  NodeP for_stmt(ExprParser& ep, int line) {
    auto n = make<Node>(Node::For, line);
    n->vars.push_back(ep.name());
    while (ep.is_op(",")) {
      ep.next();
      n->vars.push_back(ep.name());
    }
    ep.expect_name("in");
    n->exprs.push_back(ep.or_expr());
    if (ep.is_name("if")) {  // loop filter
      ep.next();
      n->exprs.push_back(ep.expression());
    }
    if (ep.is_name("recursive")) fail(line, "recursive loops are not supported");
    ep.expect_end();
    auto loop_body = make<Node>(Node::Seq, line);
    ExprParser* stop = nullptr;
    std::string kw = body(*loop_body, {"else", "endfor"}, &stop);
    n->kids.push_back(std::move(loop_body));
    if (kw == "else") {
      stop->expect_end();
      auto other = make<Node>(Node::Seq, line);
      kw = body(*other, {"endfor"}, &stop);
      n->kids.push_back(std::move(other));
    }
    if (kw != "endfor") fail(line, "'for' is not closed by 'endfor'");
    stop->expect_end();
    return n;
  }

  NodeP parse() {
    auto root = make<Node>(Node::Seq, 1);
    ExprParser* stop = nullptr;
    const std::string kw = body(*root, {"endif", "endfor", "elif", "else", "endgeneration"}, &stop);
    if (!kw.empty()) fail(stop->peek().line, "'" + kw + "' without its opening tag");
    return root;
  }

  // The expressions live in the nodes; the parsers only hold tokens.
 private:
  std::vector<Piece> p_;
  size_t i_ = 0;
  int depth_ = 0;
  std::vector<std::unique_ptr<ExprParser>> parsers_;
};

// --- Rendering ---------------------------------------------------------------------------------

class Renderer {
 public:
  Renderer(const json& ctx, size_t max_steps) : max_steps_(max_steps) { scopes_.push_back(ctx); }
  std::string out;

  Flow exec(const Node& n) {
    step(n.line);
    switch (n.kind) {
      case Node::Seq:
        for (const auto& k : n.kids) {
          const Flow f = exec(*k);
          if (f != Flow::Normal) return f;
        }
        return Flow::Normal;
      case Node::Text:
        check_size(out.size() + n.text.size(), n.line);
        out += n.text;
        return Flow::Normal;
      case Node::Out: {
        const std::string text = to_str(eval(*n.exprs[0]));
        check_size(out.size() + text.size(), n.line);
        out += text;
        return Flow::Normal;
      }
      case Node::If:
        for (size_t b = 0; b < n.exprs.size(); ++b)
          if (truthy(eval(*n.exprs[b]))) return exec(*n.kids[b]);
        return n.kids.size() > n.exprs.size() ? exec(*n.kids.back()) : Flow::Normal;
      case Node::Set: {
        json v = eval(*n.exprs[0]);
        if (n.attr.empty()) {
          scopes_.back()[n.text] = std::move(v);
          return Flow::Normal;
        }
        json* target = find(n.text);
        if (!target || !target->is_object())
          fail(n.line, "'" + n.text + "' is not a namespace, cannot set '" + n.attr + "'");
        (*target)[n.attr] = std::move(v);
        return Flow::Normal;
      }
      case Node::For:
        return exec_for(n);
      case Node::Break:
        return Flow::Break;
      case Node::Continue:
        return Flow::Continue;
    }
    return Flow::Normal;
  }

 private:
  std::vector<json> scopes_;  // innermost last; loops open one
  const size_t max_steps_;
  size_t steps_ = 0;

  // Counts `n` steps of work; refuses the template past max_steps_.
  void step(int line, size_t n = 1) {
    steps_ += n;
    if (steps_ > max_steps_)
      fail(line, "rendering takes more than " + std::to_string(max_steps_) +
                     " steps (a loop without end, or a conversation too long for this template)");
  }
  // A copy of a list or mapping costs a step per element.
  void charge_copy(const json& v, int line) {
    if (v.is_array() || v.is_object()) step(line, v.size());
  }

  json* find(const std::string& name) {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto f = it->find(name);
      if (f != it->end()) return &*f;
    }
    return nullptr;
  }

  Flow exec_for(const Node& n) {
    json seq = eval(*n.exprs[0]);
    charge_copy(seq, n.line);
    std::vector<json> items;
    if (seq.is_array()) {
      items.assign(seq.begin(), seq.end());
    } else if (seq.is_object()) {
      for (auto it = seq.begin(); it != seq.end(); ++it) items.push_back(it.key());
    } else if (seq.is_string()) {
      for (char32_t c : chars(seq.get<std::string>())) items.push_back(utf8(c));
    } else if (!is_undefined(seq) && !seq.is_null()) {
      fail(n.line, "cannot loop over a " + type_name(seq));
    }
    scopes_.push_back(json::object());
    auto bind = [&](const json& item) {
      json& scope = scopes_.back();
      if (n.vars.size() == 1) {
        scope[n.vars[0]] = item;
        return;
      }
      if (!item.is_array() || item.size() != n.vars.size())
        fail(n.line, "cannot unpack a " + type_name(item) + " into " +
                         std::to_string(n.vars.size()) + " loop variables");
      for (size_t k = 0; k < n.vars.size(); ++k) scope[n.vars[k]] = item[k];
    };
    if (n.exprs.size() > 1) {  // {% for x in xs if cond %}: filter first, loop.* counts the rest
      std::vector<json> kept;
      for (const auto& item : items) {
        bind(item);
        if (truthy(eval(*n.exprs[1]))) kept.push_back(item);
      }
      items.swap(kept);
    }
    const size_t len = items.size();
    for (size_t i = 0; i < len; ++i) {
      scopes_.back() = json::object();
      bind(items[i]);
      scopes_.back()["loop"] = {{"index", i + 1},
                                {"index0", i},
                                {"revindex", len - i},
                                {"revindex0", len - i - 1},
                                {"first", i == 0},
                                {"last", i + 1 == len},
                                {"length", len},
                                {"previtem", i > 0 ? items[i - 1] : undefined()},
                                {"nextitem", i + 1 < len ? items[i + 1] : undefined()}};
      if (exec(*n.kids[0]) == Flow::Break) break;
    }
    scopes_.pop_back();
    if (len == 0 && n.kids.size() > 1) return exec(*n.kids[1]);
    return Flow::Normal;
  }

  // Positional and keyword arguments of a call, filter or test (kids from `first`).
  struct Args {
    std::vector<json> pos;
    std::map<std::string, json> kw;
    json get(size_t i, const char* name, json def = undefined()) const {
      if (i < pos.size()) return pos[i];
      auto it = kw.find(name);
      return it == kw.end() ? def : it->second;
    }
  };
  Args args(const Expr& e, size_t first) {
    Args a;
    const size_t n_kw = e.kwnames.size(), n_pos = e.kids.size() - first - n_kw;
    for (size_t i = 0; i < n_pos; ++i) a.pos.push_back(eval(*e.kids[first + i]));
    for (size_t i = 0; i < n_kw; ++i) a.kw[e.kwnames[i]] = eval(*e.kids[first + n_pos + i]);
    return a;
  }

  static std::string need_str(const json& v, int line, const std::string& what) {
    if (!v.is_string()) fail(line, what + " needs a string, got a " + type_name(v));
    return v.get<std::string>();
  }

  json eval(const Expr& e) {
    step(e.line);
    switch (e.kind) {
      case Expr::Lit:
        return e.value;
      case Expr::Var: {
        const json* v = find(e.name);
        if (!v) return undefined();
        charge_copy(*v, e.line);
        return *v;
      }
      case Expr::Attr: {
        const json o = eval(*e.kids[0]);
        if (o.is_object() && o.contains(e.name)) return o[e.name];
        return undefined();
      }
      case Expr::Index: {
        const json o = eval(*e.kids[0]), k = eval(*e.kids[1]);
        if (o.is_object() && k.is_string())
          return o.contains(k.get<std::string>()) ? o[k.get<std::string>()] : undefined();
        if ((o.is_array() || o.is_string()) && k.is_number_integer()) {
          const std::u32string cps = o.is_string() ? chars(o.get<std::string>()) : std::u32string();
          const long long n = static_cast<long long>(o.is_array() ? o.size() : cps.size());
          long long i = k.get<long long>();
          if (i < 0) i += n;
          if (i < 0 || i >= n) return undefined();
          return o.is_array() ? o[size_t(i)] : json(utf8(cps[size_t(i)]));
        }
        return undefined();
      }
      case Expr::Slice:
        return slice(eval(*e.kids[0]), e.kids[1] ? eval(*e.kids[1]) : undefined(),
                     e.kids[2] ? eval(*e.kids[2]) : undefined(),
                     e.kids[3] ? eval(*e.kids[3]) : undefined(), e.line);
      case Expr::Call:
        return call(e);
      case Expr::Filter:
        return filter(e);
      case Expr::Test:
        return test(e) != e.negated;
      case Expr::Not:
        return !truthy(eval(*e.kids[0]));
      case Expr::Neg: {
        const json v = eval(*e.kids[0]);
        if (v.is_number_integer()) return checked('-', 0, v.get<long long>(), e.line);
        if (v.is_number()) return -v.get<double>();
        fail(e.line, "cannot negate a " + type_name(v));
      }
      case Expr::Bin:
        return binary(e);
      case Expr::Cond:
        return truthy(eval(*e.kids[1])) ? eval(*e.kids[0]) : eval(*e.kids[2]);
      case Expr::List: {
        json l = json::array();
        for (const auto& k : e.kids) l.push_back(eval(*k));
        return l;
      }
      case Expr::Dict: {
        json d = json::object();
        for (size_t i = 0; i + 1 < e.kids.size(); i += 2)
          d[need_str(eval(*e.kids[i]), e.line, "a dict key")] = eval(*e.kids[i + 1]);
        return d;
      }
    }
    return undefined();
  }

  json binary(const Expr& e) {
    const std::string& op = e.name;
    if (op == "and") {
      json a = eval(*e.kids[0]);
      return truthy(a) ? eval(*e.kids[1]) : a;
    }
    if (op == "or") {
      json a = eval(*e.kids[0]);
      return truthy(a) ? a : eval(*e.kids[1]);
    }
    const json a = eval(*e.kids[0]), b = eval(*e.kids[1]);
    if (op == "~") {
      std::string x = to_str(a), y = to_str(b);
      check_size(x.size() + y.size(), e.line);
      return x + y;
    }
    if (op == "==") return equal(a, b);
    if (op == "!=") return !equal(a, b);
    if (op == "in" || op == "not in") {
      bool in = false;
      if (b.is_string())
        in = b.get<std::string>().find(need_str(a, e.line, "'in' a string")) != std::string::npos;
      else if (b.is_array())
        in = std::any_of(b.begin(), b.end(), [&](const json& x) { return equal(x, a); });
      else if (b.is_object())
        in = a.is_string() && b.contains(a.get<std::string>());
      else if (!is_undefined(b) && !b.is_null())
        fail(e.line, "'in' needs a string, list or mapping");
      return op == "in" ? in : !in;
    }
    if (op == "<" || op == ">" || op == "<=" || op == ">=") {
      int c;
      if (a.is_number() && b.is_number()) {
        const double x = a.get<double>(), y = b.get<double>();
        c = x < y ? -1 : x > y;
      } else if (a.is_string() && b.is_string()) {
        c = a.get<std::string>().compare(b.get<std::string>());
      } else {
        fail(e.line, "cannot compare a " + type_name(a) + " with a " + type_name(b));
      }
      return op == "<" ? c < 0 : op == ">" ? c > 0 : op == "<=" ? c <= 0 : c >= 0;
    }
    if (op == "+" && a.is_string() && b.is_string()) {
      check_size(a.get_ref<const std::string&>().size() + b.get_ref<const std::string&>().size(),
                 e.line);
      return a.get<std::string>() + b.get<std::string>();
    }
    if (op == "+" && a.is_array() && b.is_array()) {
      step(e.line, a.size() + b.size());
      json l = a;
      for (const auto& x : b) l.push_back(x);
      return l;
    }
    if (op == "*" && a.is_string() && b.is_number_integer()) {
      const std::string& unit = a.get_ref<const std::string&>();
      const long long times = unit.empty() ? 0 : std::max(0LL, b.get<long long>());
      if (times > 0) check_size(size_t(times) > kMaxBytes ? kMaxBytes + 1 : unit.size() * size_t(times), e.line);
      std::string s;
      for (long long i = 0; i < times; ++i) s += unit;
      return s;
    }
    if (!a.is_number() || !b.is_number() || a.is_boolean() || b.is_boolean())
      fail(e.line, "cannot apply '" + op + "' to a " + type_name(a) + " and a " + type_name(b));
    const bool ints = a.is_number_integer() && b.is_number_integer();
    const double x = a.get<double>(), y = b.get<double>();
    if ((op == "/" || op == "//" || op == "%") && y == 0) fail(e.line, "division by zero");
    if (ints && op != "/") {
      const long long i = a.get<long long>(), j = b.get<long long>();
      if (op == "+" || op == "-" || op == "*") return checked(op[0], i, j, e.line);
      if (op == "//") return to_integer(std::floor(double(i) / double(j)), e.line);
      if (op == "%") {  // the sign of the divisor, as Python's
        const long long r = j == -1 ? 0 : i % j;
        return r != 0 && (r < 0) != (j < 0) ? r + j : r;
      }
      if (op == "**") return to_integer(std::pow(double(i), double(j)), e.line);
    }
    if (op == "+") return x + y;
    if (op == "-") return x - y;
    if (op == "*") return x * y;
    if (op == "/") return x / y;
    if (op == "//") return std::floor(x / y);
    if (op == "%") return x - y * std::floor(x / y);
    return std::pow(x, y);
  }

  json call(const Expr& e) {
    const Expr& callee = *e.kids[0];
    const Args a = args(e, 1);
    if (callee.kind == Expr::Var && !find(callee.name)) {
      const std::string& f = callee.name;
      if (f == "raise_exception")
        throw Error("chat template: " + to_str(a.get(0, "message", "error")));
      if (f == "namespace") {
        json ns = json::object();
        for (const auto& [k, v] : a.kw) ns[k] = v;
        return ns;
      }
      if (f == "range") {
        long long lo = 0, hi, by = 1;
        for (const auto& v : a.pos)
          if (!v.is_number_integer()) fail(e.line, "range() needs integers");
        if (a.pos.size() == 1)
          hi = a.pos[0].get<long long>();
        else if (a.pos.size() >= 2)
          lo = a.pos[0].get<long long>(), hi = a.pos[1].get<long long>();
        else
          fail(e.line, "range() needs 1 to 3 arguments");
        if (a.pos.size() == 3) by = a.pos[2].get<long long>();
        if (by == 0) fail(e.line, "range() step cannot be zero");
        const __int128 span = by > 0 ? __int128(hi) - lo : __int128(lo) - hi;
        const __int128 count = span <= 0 ? 0 : (span + (by > 0 ? by : -__int128(by)) - 1) /
                                                   (by > 0 ? by : -__int128(by));
        step(e.line, count > __int128(max_steps_) ? max_steps_ + 1 : size_t(count));
        json l = json::array();
        for (__int128 k = 0; k < count; ++k) l.push_back(static_cast<long long>(lo + k * by));
        return l;
      }
      if (f == "strftime_now") {  // transformers provides it (Llama 3.1+ templates)
        const std::time_t t = std::time(nullptr);
        std::tm tm{};
        localtime_r(&t, &tm);
        char buf[128];
        const size_t n = std::strftime(
            buf, sizeof buf, need_str(a.get(0, "format"), e.line, "strftime_now").c_str(), &tm);
        return std::string(buf, n);
      }
      fail(e.line, "unknown function '" + f + "'");
    }
    if (callee.kind != Expr::Attr) fail(e.line, "this value cannot be called");
    const json self = eval(*callee.kids[0]);
    const std::string& m = callee.name;
    if (self.is_string()) {
      const std::string s = self.get<std::string>();
      auto strip_set = [&] {
        const json c = a.get(0, "chars");
        return c.is_string() ? c.get<std::string>() : kSpace;
      };
      if (m == "strip") return strip(s, strip_set(), true, true);
      if (m == "lstrip") return strip(s, strip_set(), true, false);
      if (m == "rstrip") return strip(s, strip_set(), false, true);
      if (m == "upper") return upper(s);
      if (m == "lower") return lower(s);
      if (m == "title") return title(s);
      if (m == "capitalize") return capitalize(s);
      if (m == "startswith" || m == "endswith") {
        const json p = a.get(0, "prefix");
        std::vector<std::string> opts;
        if (p.is_array())
          for (const auto& x : p) opts.push_back(need_str(x, e.line, m));
        else
          opts.push_back(need_str(p, e.line, m));
        for (const auto& o : opts)
          if (m == "startswith" ? s.starts_with(o) : s.ends_with(o)) return true;
        return false;
      }
      if (m == "replace")
        return replace_all(s, need_str(a.get(0, "old"), e.line, m),
                           need_str(a.get(1, "new"), e.line, m), e.line);
      if (m == "split") {
        json l = json::array();
        const json sep = a.get(0, "sep");
        if (!sep.is_string()) {  // on runs of whitespace
          size_t i = 0;
          while ((i = s.find_first_not_of(kSpace, i)) != std::string::npos) {
            const size_t j = s.find_first_of(kSpace, i);
            l.push_back(s.substr(i, j == std::string::npos ? j : j - i));
            i = j;
          }
          return l;
        }
        const std::string d = sep.get<std::string>();
        if (d.empty()) fail(e.line, "split() with an empty separator");
        size_t i = 0, j;
        while ((j = s.find(d, i)) != std::string::npos) {
          l.push_back(s.substr(i, j - i));
          i = j + d.size();
        }
        l.push_back(s.substr(i));
        return l;
      }
      if (m == "find") {
        const size_t at = s.find(need_str(a.get(0, "sub"), e.line, m));
        return at == std::string::npos ? -1LL
                                       : static_cast<long long>(chars(s.substr(0, at)).size());
      }
    } else if (self.is_object()) {
      if (m == "items") {
        json l = json::array();
        for (auto it = self.begin(); it != self.end(); ++it) l.push_back({it.key(), *it});
        return l;
      }
      if (m == "keys" || m == "values") {
        json l = json::array();
        for (auto it = self.begin(); it != self.end(); ++it)
          l.push_back(m == "keys" ? json(it.key()) : *it);
        return l;
      }
      if (m == "get") {
        const std::string k = need_str(a.get(0, "key"), e.line, "get()");
        return self.contains(k) ? self[k] : a.get(1, "default", nullptr);
      }
    }
    fail(e.line, "a " + type_name(self) + " has no method '" + m + "'");
  }

  json filter(const Expr& e) {
    const json v = eval(*e.kids[0]);
    const Args a = args(e, 1);
    const std::string& f = e.name;
    if (f == "default" || f == "d") {
      const bool boolean = truthy(a.get(1, "boolean", false));
      return is_undefined(v) || (boolean && !truthy(v)) ? a.get(0, "default_value", "") : v;
    }
    if (f == "trim") return strip(need_str(v, e.line, "trim"), kSpace, true, true);
    if (f == "upper") return upper(need_str(v, e.line, "upper"));
    if (f == "lower") return lower(need_str(v, e.line, "lower"));
    if (f == "capitalize") return capitalize(need_str(v, e.line, "capitalize"));
    if (f == "title") return title(need_str(v, e.line, "title"));
    if (f == "replace")
      return replace_all(need_str(v, e.line, f), need_str(a.get(0, "old"), e.line, f),
                         need_str(a.get(1, "new"), e.line, f), e.line);
    if (f == "length" || f == "count") {
      if (v.is_string()) return chars(v.get<std::string>()).size();
      if (v.is_array() || v.is_object()) return v.size();
      fail(e.line, "a " + type_name(v) + " has no length");
    }
    if (f == "string") return to_str(v);
    if (f == "safe" || f == "e" || f == "escape") return v;  // no autoescaping in chat templates
    if (f == "int") {
      if (v.is_number_integer()) return v;
      if (v.is_number()) return to_integer(std::trunc(v.get<double>()), e.line);
      if (v.is_string()) try {
          return std::stoll(v.get<std::string>());
        } catch (...) {
        }
      return a.get(0, "default", 0);
    }
    if (f == "tojson") {
      const json ind = a.get(0, "indent");
      std::string out;
      dump_json(v, ind.is_number_integer() ? ind.get<int>() : -1, 0, out);
      return out;
    }
    if (f == "list") {
      if (v.is_array()) return v;
      if (v.is_string()) {
        json l = json::array();
        for (char32_t c : chars(v.get<std::string>())) l.push_back(utf8(c));
        return l;
      }
      if (v.is_object()) {
        json l = json::array();
        for (auto it = v.begin(); it != v.end(); ++it) l.push_back(it.key());
        return l;
      }
      fail(e.line, "cannot make a list of a " + type_name(v));
    }
    if (f == "items") {
      if (!v.is_object()) fail(e.line, "items needs a mapping");
      json l = json::array();
      for (auto it = v.begin(); it != v.end(); ++it) l.push_back({it.key(), *it});
      return l;
    }
    if (f == "first" || f == "last") {
      if (v.is_array()) return v.empty() ? undefined() : f == "first" ? v.front() : v.back();
      if (v.is_string()) {
        const std::u32string c = chars(v.get<std::string>());
        return c.empty() ? undefined() : json(utf8(f == "first" ? c.front() : c.back()));
      }
      fail(e.line, f + " needs a list or a string");
    }
    if (f == "reverse") {
      if (v.is_string()) {
        std::u32string c = chars(v.get<std::string>());
        std::reverse(c.begin(), c.end());
        return utf8(c);
      }
      if (!v.is_array()) fail(e.line, "reverse needs a list or a string");
      json l = json::array();
      for (auto it = v.rbegin(); it != v.rend(); ++it) l.push_back(*it);
      return l;
    }
    if (f == "join") {
      if (!v.is_array()) fail(e.line, "join needs a list");
      const json sep = a.get(0, "d", "");
      std::string s;
      for (size_t i = 0; i < v.size(); ++i) {
        const std::string item = (i ? to_str(sep) : "") + to_str(v[i]);
        check_size(s.size() + item.size(), e.line);
        s += item;
      }
      return s;
    }
    if (f == "selectattr" || f == "rejectattr" || f == "map") {
      if (!v.is_array()) fail(e.line, f + " needs a list");
      json l = json::array();
      if (f == "map") {
        const json attr = a.get(99, "attribute");
        if (!attr.is_string()) fail(e.line, "only map(attribute='name') is supported");
        for (const auto& x : v)
          l.push_back(x.is_object() && x.contains(attr.get<std::string>())
                          ? x[attr.get<std::string>()]
                          : a.get(99, "default"));
        return l;
      }
      const std::string attr = need_str(a.get(0, "attr"), e.line, f);
      for (const auto& x : v) {
        const json val = x.is_object() && x.contains(attr) ? x[attr] : undefined();
        bool ok;
        if (a.pos.size() < 2) {
          ok = truthy(val);
        } else {
          ok = named_test(need_str(a.pos[1], e.line, f), val,
                          std::vector<json>(a.pos.begin() + 2, a.pos.end()), e.line);
        }
        if (ok == (f == "selectattr")) l.push_back(x);
      }
      return l;
    }
    if (f == "abs" && v.is_number()) {
      if (!v.is_number_integer()) return std::fabs(v.get<double>());
      const long long x = v.get<long long>();
      return x < 0 ? checked('-', 0, x, e.line) : x;
    }
    fail(e.line, "unknown filter '" + f + "'");
  }

  bool named_test(const std::string& t, const json& v, const std::vector<json>& a, int line) {
    if (t == "defined") return !is_undefined(v);
    if (t == "undefined") return is_undefined(v);
    if (t == "none") return v.is_null();
    if (t == "string") return v.is_string();
    if (t == "number") return v.is_number() && !v.is_boolean();
    if (t == "integer") return v.is_number_integer();
    if (t == "float") return v.is_number_float();
    if (t == "boolean") return v.is_boolean();
    if (t == "true") return v.is_boolean() && v.get<bool>();
    if (t == "false") return v.is_boolean() && !v.get<bool>();
    if (t == "mapping") return v.is_object();
    if (t == "sequence" || t == "iterable")
      return v.is_array() || v.is_string() || (t == "iterable" && v.is_object());
    if (t == "callable") return false;
    if (t == "even" || t == "odd") {
      if (!v.is_number_integer()) fail(line, t + " needs an integer");
      return (v.get<long long>() % 2 == 0) == (t == "even");
    }
    if (t == "equalto" || t == "eq" || t == "==" || t == "sameas") {
      if (a.empty()) fail(line, "'" + t + "' needs a value to compare with");
      return equal(v, a[0]);
    }
    if (t == "ne" || t == "!=") return a.empty() || !equal(v, a[0]);
    if (t == "in")
      return !a.empty() && a[0].is_array() &&
             std::any_of(a[0].begin(), a[0].end(), [&](const json& x) { return equal(x, v); });
    fail(line, "unknown test '" + t + "'");
  }

  bool test(const Expr& e) {
    const json v = eval(*e.kids[0]);
    const Args a = args(e, 1);
    return named_test(e.name, v, a.pos, e.line);
  }
};

}  // namespace

Template::Template(std::string_view source) : root_(StmtParser(lex(source)).parse()) {}
Template::~Template() = default;
Template::Template(Template&&) noexcept = default;
Template& Template::operator=(Template&&) noexcept = default;

std::string Template::render(const json& context, size_t max_steps) const {
  Renderer r(context.is_object() ? context : json::object(), max_steps);
  if (r.exec(*root_) != Flow::Normal)
    throw Error("chat template: 'break' or 'continue' outside a loop");
  return std::move(r.out);
}

}  // namespace mp::jinja
