"""Prompt sets for `dflash train`: the named sets (NAMED_PROMPT_SETS), prompt files, and the SmolLM2 target's
generated training prompts for self-distillation and small held-out set.

Three categories, matching the `smol` profile's datasets: arithmetic word problems (math), everyday questions
(chat) and Python function tasks written like HumanEval prompts (code). Training and held-out prompts are drawn
from disjoint halves of every word list (names, objects, topics, tasks), so a held-out prompt never repeats a
training prompt's content; HumanEval itself is never used for training.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import DFlashError

NAMES = ("Ava Ben Chloe Dan Emma Finn Grace Hugo Iris Jack Kira Liam Maya Noah Olga Paul Quinn Rosa Sam Tara "
         "Umar Vera Will Xena Yuri Zoe Aria Bruno Cleo Diego").split()
OBJECTS = ("apples pencils marbles stickers books cookies stamps shells coins cards balloons candles buttons "
           "flowers bottles tickets oranges crayons blocks ribbons").split()
PLACES = "store market bakery library school garden museum park farm station".split()
TOPICS = ("the ocean|volcanoes|the moon|bees|rainforests|the internet|photosynthesis|gravity|electricity|"
          "the heart|clouds|deserts|dinosaurs|recycling|the Roman Empire|music|chess|coffee|sleep|friendship|"
          "solar panels|earthquakes|the printing press|vaccines|airplanes|bread|glaciers|owls|the stock market|"
          "exercise|rainbows|magnets").split("|")
ACTIVITIES = ("learning a new language|staying focused while studying|cooking a healthy dinner|saving money|"
              "starting to run|keeping a plant alive|writing a good email|preparing for a job interview|"
              "sleeping better|making new friends|organizing a small room|traveling on a budget|"
              "giving a presentation|reading more books|learning to draw|staying hydrated").split("|")
PAIRS = ("a virus and a bacterium|weather and climate|a lake and a sea|a comet and an asteroid|a list and a tuple|"
         "speed and velocity|a noun and a verb|a city and a town|an ocean and a river|a frog and a toad|"
         "a laptop and a desktop|a poem and a story|tea and coffee|a planet and a star|rain and snow|"
         "a CPU and a GPU").split("|")

MATH_TEMPLATES = (
    "{a} has {x} {obj}. {b} gives {a} {y} more {obj}. How many {obj} does {a} have now?",
    "{a} bought {x} {obj} at the {place} and then gave away {y} of them. How many {obj} are left?",
    "A box holds {x} {obj}. How many {obj} are in {y} boxes?",
    "{a} has {x} {obj} and wants to share them equally among {y} friends. How many does each friend get, "
    "and how many are left over?",
    "{a} reads {x} pages every day. How many pages does {a} read in {y} days?",
    "{a} had {x} dollars and spent {y} dollars at the {place}. How much money does {a} have left?",
    "There are {x} {obj} in one basket and {y} {obj} in another. How many {obj} are there in total?",
    "{a} is {x} years old and {b} is {y} years older. How old will {b} be in 5 years?",
    "What is {x} times {y}?",
    "What is {x} plus {y}, minus {z}?",
)
CHAT_TEMPLATES = (
    "Explain {topic} in simple terms.",
    "Give me three tips for {activity}.",
    "What is the difference between {pair}?",
    "Write a short poem about {topic}.",
    "Tell me an interesting fact about {topic}.",
    "Why is {topic} important?",
    "How do I get better at {activity}?",
    "Summarize what you know about {topic} in two sentences.",
    "What are some common mistakes people make when {activity}?",
    "Can you compare {pair} in a short table?",
    "Describe {topic} to a ten-year-old.",
    "What is a good first step for {activity}?",
    "List five words that come to mind when you think of {topic}.",
    "How would you explain the difference between {pair} to a friend?",
    "Write a short story that involves {topic}.",
    "What questions should I ask myself before {activity}?",
)
# (function name, arguments, docstring, example call, example result)
CODE_TASKS = (
    ("sum_list", "numbers", "Return the sum of a list of numbers.", "[1, 2, 3]", "6"),
    ("count_vowels", "text", "Return the number of vowels in a string.", "'hello'", "2"),
    ("reverse_words", "sentence", "Return the sentence with the order of its words reversed.", "'a b c'", "'c b a'"),
    ("is_palindrome", "text", "Return True if the string reads the same backwards.", "'level'", "True"),
    ("max_of_three", "a, b, c", "Return the largest of three numbers.", "1, 5, 3", "5"),
    ("factorial", "n", "Return n factorial.", "5", "120"),
    ("fibonacci", "n", "Return the n-th Fibonacci number.", "7", "13"),
    ("remove_duplicates", "items", "Return the list without duplicates, keeping the first occurrence.",
     "[1, 2, 1, 3]", "[1, 2, 3]"),
    ("count_words", "text", "Return the number of words in a string.", "'one two three'", "3"),
    ("celsius_to_fahrenheit", "celsius", "Convert a temperature from Celsius to Fahrenheit.", "100", "212.0"),
    ("is_prime", "n", "Return True if n is a prime number.", "7", "True"),
    ("flatten", "nested", "Flatten a list of lists into one list.", "[[1, 2], [3]]", "[1, 2, 3]"),
    ("average", "numbers", "Return the average of a non-empty list of numbers.", "[2, 4, 6]", "4.0"),
    ("capitalize_words", "text", "Capitalize the first letter of every word.", "'hi there'", "'Hi There'"),
    ("second_largest", "numbers", "Return the second largest distinct number in the list.", "[3, 1, 4, 4]", "3"),
    ("gcd", "a, b", "Return the greatest common divisor of a and b.", "12, 18", "6"),
    ("count_char", "text, char", "Return how many times char occurs in text.", "'banana', 'a'", "3"),
    ("even_numbers", "numbers", "Return only the even numbers of the list.", "[1, 2, 3, 4]", "[2, 4]"),
    ("merge_dicts", "first, second", "Merge two dictionaries; values of second win.", "{'a': 1}, {'a': 2}",
     "{'a': 2}"),
    ("digits_sum", "n", "Return the sum of the digits of a non-negative integer.", "123", "6"),
    ("longest_word", "sentence", "Return the longest word in the sentence.", "'a bb ccc'", "'ccc'"),
    ("square_all", "numbers", "Return a list with every number squared.", "[1, 2, 3]", "[1, 4, 9]"),
    ("is_sorted", "items", "Return True if the list is sorted in ascending order.", "[1, 2, 2]", "True"),
    ("char_frequency", "text", "Return a dictionary mapping each character to its count.", "'aab'",
     "{'a': 2, 'b': 1}"),
    ("running_total", "numbers", "Return the running totals of the list.", "[1, 2, 3]", "[1, 3, 6]"),
    ("binary_string", "n", "Return the binary representation of n as a string without prefix.", "5", "'101'"),
    ("common_elements", "a, b", "Return the sorted list of elements found in both lists.", "[1, 2], [2, 3]", "[2]"),
    ("rotate_list", "items, k", "Rotate the list to the right by k positions.", "[1, 2, 3], 1", "[3, 1, 2]"),
    ("title_length", "words", "Return the total length of all strings in the list.", "['ab', 'c']", "3"),
    ("min_max", "numbers", "Return a tuple (smallest, largest) of the list.", "[3, 1, 2]", "(1, 3)"),
    ("count_positive", "numbers", "Return how many numbers in the list are positive.", "[-1, 2, 3]", "2"),
    ("repeat_string", "text, times", "Return the string repeated the given number of times.", "'ab', 2",
     "'abab'"),
)
CODE_FRAMES = (
    "Write a solution to the following problem and make sure that it passes the tests:\n```python\n"
    "def {name}({args}):\n    \"\"\" {doc}\n    >>> {name}({call})\n    {result}\n    \"\"\"\n```",
    "Write a Python function `{name}({args})`. {doc}",
    "Complete this Python function:\n```python\ndef {name}({args}):\n    \"\"\"{doc}\"\"\"\n```",
)


def _half(items, held_out: bool):
    """Even-indexed items for training, odd-indexed for held-out prompts."""
    return list(items[1::2] if held_out else items[0::2])


def math_prompts(count: int, seed: int, *, held_out: bool = False) -> list[str]:
    rng = random.Random(seed)
    names, objects, places = _half(NAMES, held_out), _half(OBJECTS, held_out), _half(PLACES, held_out)
    prompts = []
    for _ in range(count):
        a, b = rng.sample(names, 2)
        x, y = rng.randint(3, 60), rng.randint(2, 12)
        prompts.append(rng.choice(MATH_TEMPLATES).format(a=a, b=b, x=x, y=y, z=rng.randint(1, x),
                                                         obj=rng.choice(objects), place=rng.choice(places)))
    return prompts


def chat_prompts(count: int, seed: int, *, held_out: bool = False) -> list[str]:
    rng = random.Random(seed)
    topics, activities, pairs = _half(TOPICS, held_out), _half(ACTIVITIES, held_out), _half(PAIRS, held_out)
    return [rng.choice(CHAT_TEMPLATES).format(topic=rng.choice(topics), activity=rng.choice(activities),
                                              pair=rng.choice(pairs)) for _ in range(count)]


def code_prompts(count: int, seed: int, *, held_out: bool = False) -> list[str]:
    rng = random.Random(seed)
    tasks = _half(CODE_TASKS, held_out)
    prompts = []
    for _ in range(count):
        name, args, doc, call, result = rng.choice(tasks)
        prompts.append(rng.choice(CODE_FRAMES).format(name=name, args=args, doc=doc, call=call, result=result))
    return prompts


STDLIB_MODULES = ("textwrap", "string", "heapq", "bisect", "statistics", "colorsys", "fnmatch", "shlex",
                  "calendar", "difflib", "glob", "ntpath", "posixpath", "base64", "quopri", "html", "random",
                  "fractions", "ipaddress", "csv", "gettext", "locale", "pprint", "copy", "operator", "functools")


def stdlib_function_prompts(count: int, seed: int) -> list[str]:
    """HumanEval-style prompts (signature + docstring, body removed) from Python standard library functions:
    real, varied code tasks that are not HumanEval."""
    import ast
    import importlib.util

    headers = []
    for module in STDLIB_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        tree = ast.parse(open(spec.origin, encoding="utf-8").read())
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if doc and not node.name.startswith("_") and 20 <= len(doc) <= 600:
                doc = doc.replace("\n", "\n    ")
                headers.append(f"def {node.name}({ast.unparse(node.args)}):\n    \"\"\"{doc}\n    \"\"\"")
    rng = random.Random(seed)
    rng.shuffle(headers)
    frame = CODE_FRAMES[0].split("```python")[0] + "```python\n{header}\n```"
    return [frame.format(header=h) for h in headers[:count]]


def training_prompts(per_category: int, seed: int = 0) -> dict[str, list[str]]:
    """Distinct training prompts per category (duplicates from the generators are dropped); code adds
    standard-library function headers to the generated tasks."""
    prompts = {"math": math_prompts(per_category, seed), "chat": chat_prompts(per_category, seed + 1),
               "code": code_prompts(per_category, seed + 2)}
    prompts = {c: list(dict.fromkeys(p)) for c, p in prompts.items()}
    prompts["code"] += stdlib_function_prompts(max(0, per_category - len(prompts["code"])), seed + 3)
    return prompts


def _distinct(make, count: int) -> list[str]:
    """The first `count` distinct prompts of a seeded generator `make(n)` (fewer if it has no more)."""
    for n in (count, 4 * count, 16 * count):
        prompts = list(dict.fromkeys(make(n)))
        if len(prompts) >= count:
            break
    return prompts[:count]


def heldout_prompts(per_category: int = 12, seed: int = 1000) -> dict[str, list[str]]:
    """The held-out math/chat prompts of the smol profile (its code data is HumanEval) and code tasks; distinct
    within each category."""
    return {"math": _distinct(lambda n: math_prompts(n, seed, held_out=True), per_category),
            "chat": _distinct(lambda n: chat_prompts(n, seed + 1, held_out=True), per_category),
            "code": _distinct(lambda n: code_prompts(n, seed + 2, held_out=True), per_category)}


NAMED_PROMPT_SETS = ("smol-train", "smol-heldout", "tiny-train", "tiny-heldout")


def load_prompt_texts(spec: str, *, per_category: int) -> dict[str, list[str]]:
    """Prompts by category from a named set (smol-train, smol-heldout) or a file: .txt (one prompt per line),
    .json ({category: [prompt, ...]}) or .jsonl (objects with "prompt" and optional "category")."""
    if spec == "smol-train":
        return training_prompts(per_category)
    if spec == "smol-heldout":
        raise DFlashError("smol-heldout is the smol profile's benchmark prompts: read them with "
                          "dflash.prompts.benchmark_prompt_texts.")
    if spec == "tiny-train":  # the tiny build's distillation prompts (corpus windows + fresh code headers)
        from ..loading import load_tokenizer
        from ..tinyworld.build import tiny_distillation_prompts
        return tiny_distillation_prompts(load_tokenizer("tiny"))
    if spec == "tiny-heldout":
        from ..loading import PACKAGE_MODELS
        table = json.loads((PACKAGE_MODELS / "tiny" / "heldout.json").read_text())
        return {c: prompts[:per_category] for c, prompts in table.items()}
    path = Path(spec)
    if not path.is_file():
        raise DFlashError(f"Prompts {spec!r}: not a named set ({', '.join(NAMED_PROMPT_SETS)}) and not a file. "
                          "Pass a .txt (one prompt per line), .json ({category: [prompts]}) or .jsonl file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DFlashError(f"Prompts file {path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                          "re-encode it as UTF-8.") from None
    try:
        if path.suffix == ".json":
            table = json.loads(text)
            if not isinstance(table, dict) or not all(isinstance(v, list) for v in table.values()):
                raise ValueError("expected an object mapping category names to lists of prompts")
            return {str(k): [str(p) for p in v] for k, v in table.items()}
        if path.suffix == ".jsonl":
            table: dict[str, list[str]] = {}
            for line in filter(str.strip, text.splitlines()):
                row = json.loads(line)
                table.setdefault(str(row.get("category", "all")), []).append(str(row["prompt"]))
            return table
    except (ValueError, KeyError) as error:
        raise DFlashError(f"Cannot read prompts from {path}: {error}") from None
    return {"all": [line for line in text.splitlines() if line.strip()]}


def check_prompt_texts(table: dict[str, list[str]], source: str) -> dict[str, list[str]]:
    """At least one non-empty prompt, and no category without prompts."""
    empty = [c for c, prompts in table.items() if not any(p.strip() for p in prompts)]
    if not table or empty:
        raise DFlashError(f"Prompts {source!r} hold no prompts" + (f" in categories {empty}" if table else "") +
                          ": give at least one non-empty prompt per category.")
    return table
