"""The tiny world's text: Python stdlib source + arithmetic word problems + simple chat.

Everything is built from things present on every machine (the stdlib of the running
Python) plus small fixed lists, with fixed seeds, so `build_corpus(seed)` is
deterministic for a given Python version. Three categories:

  code  raw stdlib source, chunked at top-level statement boundaries (~1-2k chars)
  math  chat-formatted word problems with a worked answer ("3 + 5 = 8. The answer is 8.")
  chat  chat-formatted instruction/response pairs: docstring questions, "write a
        function" tasks and simple facts

Held-out prompts (12 per category) come from material that never appears in training:
held-out stdlib modules (code, docstring questions), held-out names (math), held-out
facts and function tasks (chat). `heldout_texts` holds full held-out documents
(prompt + answer, or source) for measuring held-out loss.
"""

import ast
import functools
import inspect
import os
import random
import sys
import sysconfig
from dataclasses import dataclass, field

USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"


def chat_prompt(question: str) -> str:
    """The user turn plus the assistant header: what the model continues from."""
    return f"{USER}\n{question}{END}\n{ASSISTANT}\n"


def chat_sample(question: str, answer: str) -> str:
    return chat_prompt(question) + f"{answer}{END}\n"


# ----------------------------------------------------------------------------- code
# Top-level pure-python stdlib modules used for training, by name (sorted). Missing ones
# (e.g. removed in later Pythons) are skipped. Modules that are mostly data tables
# (locale, mimetypes, stringprep, _compat_pickle), machine specific (_sysconfigdata*)
# or not code (this) are left out, as are modules removed in Python 3.12/3.13.
TRAIN_MODULES = sorted("""
__future__ _collections_abc _compression _markupbase _py_abc _pydecimal _pyio _strptime
_threading_local _weakrefset abc argparse ast bdb bz2 cProfile cmd code codecs codeop
colorsys compileall configparser contextlib copyreg csv dataclasses datetime difflib dis
doctest enum fileinput fractions ftplib functools genericpath getopt getpass gettext glob
graphlib gzip hashlib hmac imaplib inspect io ipaddress keyword lzma mailbox modulefinder
netrc ntpath numbers opcode operator optparse os pathlib pdb pickle pickletools pkgutil
platform plistlib poplib posixpath pprint profile pstats pty py_compile pyclbr queue
quopri random reprlib rlcompleter runpy sched selectors shelve shutil
signal site smtplib socket socketserver ssl stat statistics string subprocess symtable
sysconfig tabnanny tarfile threading timeit token tokenize trace traceback tracemalloc
tty types typing uuid warnings wave weakref zipapp zipfile zipimport
""".split())

# Held-out modules: stable across Python versions, each has a public top-level function
# with a docstring (the code prompt). None of their text is in training.
HELDOUT_MODULES = ["base64", "bisect", "calendar", "copy", "filecmp", "fnmatch", "heapq",
                   "linecache", "secrets", "shlex", "tempfile", "textwrap"]

HELDOUT_PROMPTS = 48  # per category; the gates gather up to this many prompts per case
MODULE_CHAR_CAP = 16_000  # keep only the first ~16k chars of each module: corpus stays small


def stdlib_sources(names):
    """{module name: source} for the names that exist as top-level .py files here."""
    root = sysconfig.get_paths()["stdlib"]
    out = {}
    for name in names:
        path = os.path.join(root, name + ".py")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                out[name] = f.read()
    return out


def chunk_source(src: str, lo: int = 1000, hi: int = 2000) -> list[str]:
    """Split source into ~lo..hi char pieces, preferring cuts before a top-level
    statement that follows a blank line (so pieces mostly hold whole defs/classes)."""
    chunks, cur = [], ""
    for line in src.splitlines(keepends=True):
        top_level = cur.endswith("\n\n") and (line[:1].isalpha() or line[:1] in "@_#")
        if cur and ((len(cur) >= lo and top_level) or len(cur) + len(line) > hi):
            chunks.append(cur)
            cur = ""
        cur += line
    if cur.strip():
        chunks.append(cur)
    return chunks


def capped_chunks(src: str, cap: int = MODULE_CHAR_CAP) -> list[str]:
    out, total = [], 0
    for c in chunk_source(src):
        if total >= cap:
            break
        out.append(c)
        total += len(c)
    return out


def first_sentence(doc: str) -> str | None:
    """First sentence of a docstring's first paragraph, or None if unusable."""
    para = inspect.cleandoc(doc).split("\n\n")[0]
    para = " ".join(para.split())
    if not para or "->" in para or para.startswith(("(", "[")):  # signature-style docs
        return None
    end = para.find(". ")
    sentence = para if end < 0 else para[: end + 1]
    if not sentence.endswith("."):
        sentence += "."
    return sentence if 10 <= len(sentence) <= 200 else None


@functools.lru_cache(maxsize=None)  # parsing the stdlib is most of build_corpus's time
def docstring_qas(module: str, src: str) -> tuple[tuple[str, str], ...]:
    """(question, answer) pairs about public functions, classes and methods of a module."""
    qas = []

    def add(kind, qualname, node):
        doc = ast.get_docstring(node)
        ans = first_sentence(doc) if doc else None
        if ans:
            qas.append((f"What does the {kind} `{module}.{qualname}` do?", ans))

    for node in ast.parse(src).body:
        if not hasattr(node, "name") or node.name.startswith("_"):
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            add("function", node.name, node)
        elif isinstance(node, ast.ClassDef):
            add("class", node.name, node)
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith("_"):
                    add("method", f"{node.name}.{sub.name}", sub)
    return tuple(qas)


@functools.lru_cache(maxsize=None)
def code_prompt(src: str, max_chars: int = 700) -> str | None:
    """The first of `code_prompts(src)`, or None."""
    return next(iter(code_prompts(src, max_chars)), None)


def code_prompts(src: str, max_chars: int = 700) -> list[str]:
    """Signature + docstring of every public top-level function with a docstring, in source order:
    natural prompts for the model to continue with the function body.

    The prompt stops right after the closing quotes, without the newline: the tokenizer
    merges a newline with the next line's indentation ("\n    " is one token), so a prompt
    ending in a bare "\n" tells the model the next line is *not* indented."""
    lines, prompts = src.splitlines(keepends=True), []
    for node in ast.parse(src).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and ast.get_docstring(node):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            prompt = "".join(lines[start - 1 : node.body[0].end_lineno]).rstrip("\n")
            if len(prompt) <= max_chars:
                prompts.append(prompt)
    return prompts


# ----------------------------------------------------------------------------- math
TRAIN_NAMES = """Tom Anna Ben Lucy Sam Mia Jack Emma Leo Zoe Max Lily Noah Ella Omar Ruby Ivan
Nina Hugo Rosa Paul Maya Alex Sara Dan Kate Finn Iris Carl Lena""".split()
HELDOUT_NAMES = "Victor Greta Rahul Yuki Olga Pedro".split()
ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "cards", "stamps", "shells",
         "coins", "balloons", "toy cars"]

# (op, template). {a} {b} are operands, {n} a name, {i} an item (plural).
MATH_TEMPLATES = [
    ("+", "{n} has {a} {i} and buys {b} more. How many {i} does {n} have now?"),
    ("+", "{n} found {a} {i} in the morning and {b} {i} in the afternoon. How many {i} did {n} find in total?"),
    ("+", "There are {a} {i} in a box. {n} puts in {b} more. How many {i} are in the box?"),
    ("+", "What is {a} plus {b}?"),
    ("-", "{n} has {a} {i} and gives {b} to a friend. How many {i} does {n} have left?"),
    ("-", "There are {a} {i} on the table. {n} takes {b} of them. How many {i} are still on the table?"),
    ("-", "What is {a} minus {b}?"),
    ("*", "{n} has {a} bags with {b} {i} in each bag. How many {i} does {n} have?"),
    ("*", "A shelf has {a} rows of {b} {i}. How many {i} are on the shelf?"),
    ("*", "What is {a} times {b}?"),
]


def math_operands(op: str, rng: random.Random) -> tuple[int, int]:
    # small numbers: the addition/multiplication tables are learnable by a tiny model
    if op == "+":
        return rng.randint(1, 20), rng.randint(1, 20)
    if op == "-":
        a = rng.randint(2, 25)
        return a, rng.randint(1, a - 1)
    return rng.randint(2, 10), rng.randint(2, 10)


def math_problem(op, template, a, b, name, item) -> tuple[str, str]:
    c = {"+": a + b, "-": a - b, "*": a * b}[op]
    q = template.format(n=name, a=a, b=b, i=item)
    return q, f"{a} {op} {b} = {c}. The answer is {c}."


# ----------------------------------------------------------------------------- chat
# (task description, code). Descriptions fill "Write a function that returns {desc}."
FUNCTION_TASKS = [
    ("the square of x", "def square(x):\n    return x * x"),
    ("the cube of x", "def cube(x):\n    return x * x * x"),
    ("twice the value of x", "def double(x):\n    return 2 * x"),
    ("half of x", "def half(x):\n    return x / 2"),
    ("x plus one", "def increment(x):\n    return x + 1"),
    ("x minus one", "def decrement(x):\n    return x - 1"),
    ("the sum of x and y", "def add(x, y):\n    return x + y"),
    ("the difference of x and y", "def subtract(x, y):\n    return x - y"),
    ("the product of x and y", "def multiply(x, y):\n    return x * y"),
    ("the remainder of x divided by y", "def remainder(x, y):\n    return x % y"),
    ("the larger of x and y", "def maximum(x, y):\n    if x > y:\n        return x\n    return y"),
    ("the smaller of x and y", "def minimum(x, y):\n    if x < y:\n        return x\n    return y"),
    ("the absolute value of x", "def absolute(x):\n    if x < 0:\n        return -x\n    return x"),
    ("whether x is even", "def is_even(x):\n    return x % 2 == 0"),
    ("whether x is odd", "def is_odd(x):\n    return x % 2 == 1"),
    ("whether x is positive", "def is_positive(x):\n    return x > 0"),
    ("the length of the string s", "def length(s):\n    return len(s)"),
    ("the string s reversed", "def reverse(s):\n    return s[::-1]"),
    ("the string s in upper case", "def shout(s):\n    return s.upper()"),
    ("the string s in lower case", "def whisper(s):\n    return s.lower()"),
    ("the string s repeated n times", "def repeat(s, n):\n    return s * n"),
    ("the number of words in the string s", "def word_count(s):\n    return len(s.split())"),
    ("whether the string s is a palindrome", "def is_palindrome(s):\n    return s == s[::-1]"),
    ("the number of vowels in the string s",
     "def count_vowels(s):\n    count = 0\n    for c in s:\n        if c in \"aeiou\":\n            count += 1\n    return count"),
    ("the first element of the list xs", "def first(xs):\n    return xs[0]"),
    ("the last element of the list xs", "def last(xs):\n    return xs[-1]"),
    ("the sum of the list xs", "def total(xs):\n    result = 0\n    for x in xs:\n        result += x\n    return result"),
    ("the average of the list xs", "def average(xs):\n    return sum(xs) / len(xs)"),
    ("the largest element of the list xs",
     "def largest(xs):\n    best = xs[0]\n    for x in xs:\n        if x > best:\n            best = x\n    return best"),
    ("the squares of the numbers in xs", "def squares(xs):\n    return [x * x for x in xs]"),
    ("the even numbers in the list xs", "def evens(xs):\n    return [x for x in xs if x % 2 == 0]"),
    ("the factorial of n",
     "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result"),
    ("the n-th Fibonacci number",
     "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a"),
    ("the list xs sorted in reverse order", "def sort_descending(xs):\n    return sorted(xs, reverse=True)"),
]
HELDOUT_TASKS = {"x minus one", "the smaller of x and y", "the string s in lower case", "the average of the list xs"}
TASK_TEMPLATES = ["Write a function that returns {d}.", "Write a Python function that returns {d}.",
                  "Please write a function that returns {d}."]

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"),
            ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Australia", "Canberra"),
            ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
            ("Poland", "Warsaw"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Ireland", "Dublin"),
            ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Thailand", "Bangkok"), ("Peru", "Lima"),
            ("Vietnam", "Hanoi"), ("Iran", "Tehran"), ("Cuba", "Havana"), ("Ghana", "Accra"),
            ("Chile", "Santiago"), ("Colombia", "Bogota")]
ANIMAL_SOUNDS = [("dog", "barks"), ("cat", "meows"), ("cow", "moos"), ("duck", "quacks"),
                 ("lion", "roars"), ("sheep", "bleats"), ("horse", "neighs"), ("pig", "oinks"),
                 ("owl", "hoots"), ("snake", "hisses"), ("bee", "buzzes"), ("frog", "croaks"),
                 ("wolf", "howls"), ("mouse", "squeaks"), ("donkey", "brays"), ("crow", "caws")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
             ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("high", "low"),
             ("rich", "poor"), ("wet", "dry"), ("strong", "weak"), ("loud", "quiet"), ("long", "short"),
             ("thick", "thin"), ("first", "last"), ("push", "pull"), ("inside", "outside"),
             ("clean", "dirty"), ("left", "right"), ("true", "false"), ("buy", "sell")]
COLORS = [("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
          ("a banana", "yellow"), ("a tomato", "red"), ("an orange", "orange"), ("a lemon", "yellow"),
          ("milk", "white"), ("a strawberry", "red"), ("a carrot", "orange"), ("an emerald", "green"),
          ("chocolate", "brown"), ("a plum", "purple")]
# Facts of each kind held out (their questions never appear in training).
HELDOUT_FACTS = {"Ghana", "Cuba", "owl", "frog", "thick", "loud", "a plum", "a lemon"}


def fact_qas(heldout: bool) -> list[tuple[str, str]]:
    qas = []
    for country, city in CAPITALS:
        if (country in HELDOUT_FACTS) == heldout:
            qas += [(f"What is the capital of {country}?", f"The capital of {country} is {city}."),
                    (f"Which city is the capital of {country}?", f"{city} is the capital of {country}.")]
    for animal, sound in ANIMAL_SOUNDS:
        if (animal in HELDOUT_FACTS) == heldout:
            a = "an" if animal[0] in "aeiou" else "a"
            qas += [(f"What sound does {a} {animal} make?", f"{a.capitalize()} {animal} {sound}."),
                    (f"What does {a} {animal} say?", f"{a.capitalize()} {animal} {sound}.")]
    for word, opp in OPPOSITES:
        if (word in HELDOUT_FACTS) == heldout:
            qas += [(f"What is the opposite of {word}?", f"The opposite of {word} is {opp}."),
                    (f"Give the opposite of the word {word}.", f"The opposite of {word} is {opp}.")]
    for thing, color in COLORS:
        if (thing in HELDOUT_FACTS) == heldout:
            qas += [(f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {color}.")]
    return qas


def task_qas(heldout: bool) -> list[tuple[str, str]]:
    return [(t.format(d=desc), code) for desc, code in FUNCTION_TASKS if (desc in HELDOUT_TASKS) == heldout
            for t in TASK_TEMPLATES]


# ----------------------------------------------------------------------------- corpus
@dataclass
class Corpus:
    train_texts: list[str]                 # shuffled training documents
    train_categories: list[str]            # "code" / "math" / "chat", parallel to train_texts
    heldout: dict[str, list[str]]          # HELDOUT_PROMPTS held-out prompts per category
    heldout_texts: dict[str, list[str]]    # full held-out documents, for held-out loss
    modules: list[str]                     # stdlib modules used for training
    heldout_modules: list[str]             # stdlib modules used for held-out code/chat
    seed: int = 0
    python_version: str = field(default_factory=lambda: sys.version.split()[0])

    def num_chars(self) -> int:
        return sum(map(len, self.train_texts))


def build_corpus(seed: int = 0, n_math: int = 4000, fact_repeats: int = 4) -> Corpus:
    rng = random.Random(seed)
    docs: list[tuple[str, str]] = []  # (category, text)

    # code: training modules' source; their docstrings become chat questions
    train_src = stdlib_sources(TRAIN_MODULES)
    heldout_src = stdlib_sources(HELDOUT_MODULES)
    for name, src in train_src.items():
        docs += [("code", c) for c in capped_chunks(src)]
        docs += [("chat", chat_sample(q, a)) for q, a in docstring_qas(name, src)]

    # math: held-out problems use held-out names (so no held-out prompt occurs in training);
    # their numbers come from the same small tables as training
    named = [t for t in MATH_TEMPLATES if "{n}" in t[1]]
    heldout_math = [math_problem(op, t, *math_operands(op, rng), rng.choice(HELDOUT_NAMES), rng.choice(ITEMS))
                    for op, t in (rng.choice(named) for _ in range(100))]
    for _ in range(n_math):
        op, t = rng.choice(MATH_TEMPLATES)
        docs.append(("math", chat_sample(*math_problem(op, t, *math_operands(op, rng), rng.choice(TRAIN_NAMES),
                                                          rng.choice(ITEMS)))))

    # chat: facts and function tasks are few, so repeat them to make them learnable
    docs += [("chat", chat_sample(q, a)) for q, a in (fact_qas(False) + task_qas(False)) * fact_repeats]

    # held-out chat: docstring questions about held-out modules, held-out tasks and facts
    held_doc_qas = [qa for name, src in heldout_src.items() for qa in docstring_qas(name, src)]
    held_task_qas, held_fact_qas = task_qas(True), fact_qas(True)
    chat_prompts = ([q for q, _ in held_doc_qas[::max(1, len(held_doc_qas) // 4)][:4]]
                    + [q for q, _ in held_task_qas[::3][:4]]
                    + [q for q, _ in held_fact_qas[::2][:4]])
    # Gate power needs more than 12 prompts per case: the first 12 stay as they were (the draft was built and
    # first measured on them), more held-out prompts of the same kinds follow.
    chat_prompts += [q for q, _ in held_task_qas + held_fact_qas + held_doc_qas if q not in chat_prompts]
    per_module = [code_prompts(src) for src in heldout_src.values()]
    code = [ps[0] for ps in per_module if ps]
    code += [p for rank in range(1, max(map(len, per_module))) for ps in per_module if len(ps) > rank
             for p in [ps[rank]]]

    heldout = {
        "code": code[:HELDOUT_PROMPTS],
        "math": [chat_prompt(q) for q, _ in heldout_math[:HELDOUT_PROMPTS]],
        "chat": [chat_prompt(q) for q in chat_prompts[:HELDOUT_PROMPTS]],
    }
    heldout_texts = {
        "code": [c for src in heldout_src.values() for c in capped_chunks(src, cap=8000)],
        "math": [chat_sample(q, a) for q, a in heldout_math],
        "chat": [chat_sample(q, a) for q, a in held_doc_qas + held_task_qas + held_fact_qas],
    }

    rng.shuffle(docs)
    return Corpus(train_texts=[t for _, t in docs], train_categories=[c for c, _ in docs],
                  heldout=heldout, heldout_texts=heldout_texts, modules=list(train_src),
                  heldout_modules=list(heldout_src), seed=seed)
