"""Question-answering data: the readers and generators the product trains on.

``blockrag finetune`` (:mod:`attention_kv.finetune`, :mod:`attention_kv.lora`) trains on QA files
(:func:`load_qa`) and on synthetic multi-hop questions (:func:`multihop_questions` over
:func:`make_multihop`'s worlds); the reranker fine-tune (:mod:`rerankers.finetune`) reads a BEIR split
(:func:`load_beir_split`). The benchmarks in ``blockrag.eval`` score on the same data and import it from
here: product code never imports eval/.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from blockrag.documents import Document, LoadError


# ------------------------------------------------------------------------------------ QA files
@dataclass
class QAExample:
    """One question: its gold answers and the ids of the documents (contexts) that hold the answer."""

    id: str
    question: str
    answers: list[str]
    gold_doc_ids: list[str] = field(default_factory=list)


@dataclass
class QADataset:
    examples: list[QAExample]
    documents: list[Document]
    source: str = ""


def _doc_id(title: str, text: str) -> str:
    # content-addressed: a context shared by several questions (or files) is one document
    return "ctx-" + hashlib.sha256(f"{title}\x00{text}".encode("utf-8")).hexdigest()[:16]


class _Builder:
    def __init__(self, source: str):
        self.source = source
        self.docs: dict[str, Document] = {}
        self.examples: list[QAExample] = []

    def context(self, text: str, title: str = "") -> str:
        text, title = str(text).strip(), str(title or "").strip()
        did = _doc_id(title, text)
        if did not in self.docs and text:
            self.docs[did] = Document(id=did, text=text, title=title)
        return did

    def dataset(self) -> QADataset:
        if not self.examples:
            raise LoadError(f"{self.source}: no questions found")
        return QADataset(self.examples, list(self.docs.values()), self.source)


def _answers(obj, where: str) -> list[str]:
    """``answers`` as a list of strings, dicts with ``text``, a dict of lists (HF squad), or a string;
    ``answer`` (+ ``answer_aliases``) as a fallback."""
    raw = obj.get("answers", obj.get("answer"))
    if isinstance(raw, dict):
        raw = raw.get("text", [])
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise LoadError(f"{where}: no 'answers' (a list of strings, or of objects with 'text')")
    out = [a["text"] if isinstance(a, dict) else a for a in raw]
    out += list(obj.get("answer_aliases") or [])
    out = [str(a) for a in out if isinstance(a, (str, int, float)) and str(a).strip()]
    if not out:
        raise LoadError(f"{where}: empty 'answers'")
    return out


def _contexts(obj, where: str) -> list[tuple[str, str, bool | None]]:
    """[(title, text, is_gold or None)] from ``context`` / ``contexts`` / ``paragraphs``.

    Accepted items: a string; ``{"title", "text"|"paragraph_text"|"content", "is_supporting"|"is_gold"}``;
    a HotpotQA / 2Wiki ``[title, [sentences]]`` pair (gold when its title is in ``supporting_facts``)."""
    raw = obj.get("contexts", obj.get("context", obj.get("paragraphs")))
    if raw is None:
        raise LoadError(f"{where}: needs 'context' (a string) or 'contexts' (a list)")
    if isinstance(raw, (str, dict)):
        raw = [raw]
    supporting = {f[0] for f in obj.get("supporting_facts") or [] if isinstance(f, (list, tuple)) and f}
    out = []
    for item in raw:
        if isinstance(item, str):
            out.append(("", item, None))
        elif isinstance(item, dict):
            text = item.get("text", item.get("paragraph_text", item.get("content")))
            if isinstance(text, list):
                text = " ".join(map(str, text))
            if not isinstance(text, str):
                raise LoadError(f"{where}: a context object has no 'text'")
            flag = item.get("is_supporting", item.get("is_gold"))
            out.append((str(item.get("title", "")), text, None if flag is None else bool(flag)))
        elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], (list, str)):
            title, sents = item
            text = "".join(sents) if isinstance(sents, list) else sents
            out.append((str(title), text, (title in supporting) if supporting else None))
        else:
            raise LoadError(f"{where}: cannot read a context of type {type(item).__name__}")
    if not out:
        raise LoadError(f"{where}: empty 'contexts'")
    return out


def _add_record(b: _Builder, obj, where: str, default_id: str) -> None:
    if not isinstance(obj, dict):
        raise LoadError(f"{where}: expected a JSON object")
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise LoadError(f"{where}: no 'question' string")
    answers = _answers(obj, where)
    ctxs = _contexts(obj, where)
    ids = [(b.context(text, title), gold) for title, text, gold in ctxs]
    gold = [d for d, g in ids if g] or ([d for d, _ in ids] if all(g is None for _, g in ids) else [])
    if not gold:
        raise LoadError(f"{where}: no context is marked as supporting the answer")
    qid = str(obj.get("id", obj.get("_id", default_id)))
    b.examples.append(QAExample(qid, question.strip(), answers, sorted(set(gold) & set(b.docs))))


def load_qa(path: str | Path) -> QADataset:
    """A SQuAD / XQuAD JSON file (``{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}``), a JSON list
    of records, or JSONL with one record per line (``question``, ``answers``, ``context`` or ``contexts``).
    Bad input raises :class:`blockrag.documents.LoadError` naming the file (and line)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"QA data not found: {path}")
    b = _Builder(str(path))
    text = path.read_text(encoding="utf-8")
    obj = None
    if path.suffix != ".jsonl":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            if path.suffix == ".json":
                raise LoadError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if isinstance(obj, dict) and "data" in obj:  # SQuAD
        for a, article in enumerate(obj["data"]):
            title = article.get("title", "")
            for p, para in enumerate(article.get("paragraphs", [])):
                where = f"{path}: data[{a}].paragraphs[{p}]"
                if not isinstance(para.get("context"), str):
                    raise LoadError(f"{where}: no 'context' string")
                did = b.context(para["context"], title)
                for j, qa in enumerate(para.get("qas", [])):
                    if qa.get("is_impossible"):
                        continue  # SQuAD 2.0 unanswerable questions have no gold answer to score
                    qid = str(qa.get("id", f"{a}-{p}-{j}"))
                    b.examples.append(QAExample(qid, str(qa.get("question", "")).strip(),
                                                _answers(qa, f"{where}.qas[{j}]"), [did]))
        return b.dataset()
    if isinstance(obj, list):
        for i, rec in enumerate(obj):
            _add_record(b, rec, f"{path}: item {i}", str(i))
        return b.dataset()
    if isinstance(obj, dict):
        _add_record(b, obj, f"{path}", "0")
        return b.dataset()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise LoadError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        _add_record(b, rec, f"{path}:{lineno}", str(lineno))
    return b.dataset()


# ------------------------------------------------------------------ synthetic multi-hop worlds
SYNTHETIC_FORMAT_VERSION = 1

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr", "q", "r",
           "s", "st", "t", "th", "tr", "v", "vr", "z", "zh", "j", "w"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "ya", "io"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "k", "m", "nd", "rk", "x", "v"]
_COMPANY_SUFFIXES = ["Dynamics", "Holdings", "Labs", "Industries", "Systems", "Works", "Foundry",
                     "Analytics", "Biotech", "Logistics", "Robotics", "Textiles", "Energy", "Mills"]
_CITY_SUFFIXES = ["", "", "", "ford", "burg", "haven", "mora", "grad", "vale", "port"]
_COUNTRY_SUFFIXES = ["ia", "land", "istan", "ovia", "ara", "esh"]
_ROLES = ["engineer", "accountant", "chemist", "designer", "lawyer", "analyst", "technician",
          "translator", "architect", "nurse", "geologist", "pilot", "economist", "archivist"]
_PRODUCTS = ["industrial pumps", "solar glass", "river barges", "medical sensors", "paper cranes",
             "ceramic tiles", "weather balloons", "bicycle frames", "seed banks", "mapping software",
             "violin strings", "insulated cables", "water filters", "cargo drones"]
_CITY_TRAITS = ["a river port", "a mountain town", "a coastal city", "a university town", "a rail hub",
                "a market town", "an old fortress city", "a lakeside city"]
_HOBBIES = ["chess", "rowing", "birdwatching", "pottery", "amateur astronomy", "choir singing",
            "long-distance running", "beekeeping", "orienteering", "woodcarving"]


@dataclass
class Question:
    id: str
    text: str
    answer: str
    hops: int
    gold_doc_ids: list[str]
    kind: str = ""
    chain: list[str] = field(default_factory=list)  # entity names along the reasoning chain


@dataclass
class SyntheticSet:
    passages: list[Document]
    questions: list[Question]
    seed: int = 0
    params: dict = field(default_factory=dict)

    def by_hops(self, hops: int) -> list[Question]:
        return [q for q in self.questions if q.hops == hops]

    def passage(self, doc_id: str) -> Document:
        if not hasattr(self, "_by_id"):
            self._by_id = {p.id: p for p in self.passages}
        return self._by_id[doc_id]

    def summary(self) -> str:
        hops = Counter(q.hops for q in self.questions)
        return (f"{len(self.passages)} passages, {len(self.questions)} questions "
                f"({', '.join(f'{h}-hop: {n}' for h, n in sorted(hops.items()))})")

    def to_jsonl(self, folder: str | Path) -> Path:
        """Write ``passages.jsonl``, ``questions.jsonl`` and ``meta.json`` (each atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / "passages.jsonl", "".join(
            json.dumps({"id": p.id, "title": p.title, "text": p.text, **p.metadata}) + "\n"
            for p in self.passages))
        _atomic_write(folder / "questions.jsonl", "".join(json.dumps(asdict(q)) + "\n" for q in self.questions))
        _atomic_write(folder / "meta.json", json.dumps(
            {"format_version": SYNTHETIC_FORMAT_VERSION, "seed": self.seed, "params": self.params}, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "SyntheticSet":
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").exists() else {}
        passages = []
        for line in (folder / "passages.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                obj = json.loads(line)
                passages.append(Document(id=obj.pop("id"), text=obj.pop("text"), title=obj.pop("title", ""),
                                         metadata=obj))
        questions = [Question(**json.loads(line))
                     for line in (folder / "questions.jsonl").read_text(encoding="utf-8").splitlines()
                     if line.strip()]
        return cls(passages=passages, questions=questions, seed=meta.get("seed", 0),
                   params=meta.get("params", {}))


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _Namer:
    """Unique pronounceable invented names; a name never contains another as a word."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: int) -> str:
        while True:
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(syllables))
            w = (w + self.rng.choice(_CODAS)).capitalize()
            if w.lower() not in self.used and len(w) >= 4:
                self.used.add(w.lower())
                return w

    def person(self) -> str:
        return f"{self.word(2)} {self.word(self.rng.choice([2, 3]))}"

    def company(self) -> str:
        return f"{self.word(self.rng.choice([2, 3]))} {self.rng.choice(_COMPANY_SUFFIXES)}"

    def city(self) -> str:
        return self.word(2) + self.rng.choice(_CITY_SUFFIXES)

    def country(self) -> str:
        return self.word(2)[:-1] + self.rng.choice(_COUNTRY_SUFFIXES) if self.rng.random() < 0.7 else self.word(3)


def make_multihop(seed: int = 0, n_people: int = 160, n_companies: int = 40, n_cities: int = 20,
                  n_countries: int = 6, n_distractors: int = 60, n_per_hop: int = 100) -> SyntheticSet:
    """A fictional world and questions over it; identical output for identical arguments.

    The world is invented (people, companies, cities, countries with made-up names), so no language model
    can know the answers: a system must read the passages. Every fact is stated in exactly one passage,
    which makes the gold passages of a question well defined: a *person* passage states who they work for,
    their role and their birthplace; a *company* passage its headquarters city, its founder and its
    founding year; a *city* passage its country and its mayor; *distractor* passages mention the same
    entities without stating any of the facts asked about.

    Questions chain the facts: 1 hop ("Which company does X work for?"), 2 hops ("In which city is the
    company that X works for headquartered?") and 3 hops ("In which country is the city where X's employer
    has its headquarters?"). The question names only the first entity of the chain; the bridge passages
    must be found through the entities of the earlier ones.

    ``n_per_hop`` questions of each hop count (fewer if the world is too small to give distinct ones).
    """
    if min(n_people, n_companies, n_cities, n_countries) < 2:
        raise ValueError("need at least 2 people, companies, cities and countries")
    rng = random.Random(seed)
    namer = _Namer(rng)
    countries = [namer.country() for _ in range(n_countries)]
    cities = [namer.city() for _ in range(n_cities)]
    companies = [namer.company() for _ in range(n_companies)]
    people = [namer.person() for _ in range(n_people)]

    city_country = {c: countries[i % n_countries] if i < n_countries else rng.choice(countries)
                    for i, c in enumerate(cities)}
    city_mayor = {c: people[rng.randrange(n_people)] for c in cities}
    company_city = {c: cities[i % n_cities] if i < n_cities else rng.choice(cities)
                    for i, c in enumerate(companies)}
    company_founder = {c: rng.choice(people) for c in companies}
    company_year = {c: rng.randint(1890, 2015) for c in companies}
    company_product = {c: rng.choice(_PRODUCTS) for c in companies}
    person_employer = {p: companies[i % n_companies] if i < n_companies else rng.choice(companies)
                       for i, p in enumerate(people)}
    person_birth = {p: rng.choice(cities) for p in people}
    person_role = {p: rng.choice(_ROLES) for p in people}
    person_pronoun = {p: rng.choice(["She", "He"]) for p in people}

    passages: list[Document] = []
    pid: dict[str, str] = {}

    def add(key: str, title: str, text: str, kind: str) -> None:
        doc_id = f"syn{len(passages):05d}"
        pid[key] = doc_id
        passages.append(Document(id=doc_id, title=title, text=text, metadata={"kind": kind}))

    # Entity passages: each states that entity's facts and nothing else asked about.
    order = ([("person", p) for p in people] + [("company", c) for c in companies] +
             [("city", c) for c in cities])
    rng.shuffle(order)
    for kind, name in order:
        if kind == "person":
            pr = person_pronoun[name]
            emp, role = person_employer[name], person_role[name]
            first = rng.choice([
                f"{name} works for {emp} as {_a(role)}.",
                f"{name} is {_a(role)} employed by {emp}.",
                f"{name} has worked as {_a(role)} at {emp} for several years.",
            ])
            birth = rng.choice([f"{pr} was born in {person_birth[name]}.",
                                f"{pr} grew up in {person_birth[name]}, where {pr.lower()} was born."])
            hobby = f"In {'her' if pr == 'She' else 'his'} spare time {pr.lower()} enjoys {rng.choice(_HOBBIES)}."
            add(name, name, " ".join([first, birth, hobby]), kind)
        elif kind == "company":
            city, founder = company_city[name], company_founder[name]
            parts = [rng.choice([f"{name} is headquartered in {city}.",
                                 f"{name} has its headquarters in {city}.",
                                 f"The head office of {name} is located in {city}."]),
                     rng.choice([f"It was founded by {founder} in {company_year[name]}.",
                                 f"{founder} founded the company in {company_year[name]}."]),
                     f"The firm is best known for its {company_product[name]}."]
            add(name, name, " ".join(parts), kind)
        else:
            parts = [rng.choice([f"{name} is {rng.choice(_CITY_TRAITS)} in {city_country[name]}.",
                                 f"{name} is a city in the country of {city_country[name]}."]),
                     rng.choice([f"Its current mayor is {city_mayor[name]}.",
                                 f"{city_mayor[name]} serves as the mayor of {name}."]),
                     f"The city is known for its {rng.choice(['festivals', 'bridges', 'markets', 'museums', 'parks'])}."]
            add(name, name, " ".join(parts), kind)

    # Distractors: the same entities and vocabulary, none of the asked facts.
    for i in range(n_distractors):
        a, b = rng.sample(people, 2)
        comp, city = rng.choice(companies), rng.choice(cities)
        text = rng.choice([
            f"At a trade fair in {city}, {a} and {b} discussed the future of {rng.choice(_PRODUCTS)}. "
            f"Analysts compared the market with the one served by {comp}.",
            f"A documentary about {city} featured interviews with {a}. "
            f"Critics said it said little about the companies of the region, such as {comp}.",
            f"{a} wrote an essay on {rng.choice(_HOBBIES)} and its history. "
            f"{b} reviewed the essay favourably in a magazine read in {city}.",
            f"Shares of {comp} moved sharply after rumours of a merger. "
            f"Neither {a} nor any other spokesperson commented on the company's plans.",
        ])
        add(f"distractor{i}", f"Note {i}", text, "distractor")

    # Questions.
    kinds = {
        1: [("employer", lambda p: (f"Which company does {p} work for?", person_employer[p],
                                    [pid[p]], [p, person_employer[p]])),
            ("birthplace", lambda p: (f"In which city was {p} born?", person_birth[p],
                                      [pid[p]], [p, person_birth[p]])),
            ("hq", lambda c: (f"In which city is {c} headquartered?", company_city[c], [pid[c]],
                              [c, company_city[c]])),
            ("founder", lambda c: (f"Who founded {c}?", company_founder[c], [pid[c]],
                                   [c, company_founder[c]]))],
        2: [("employer_hq", lambda p: (
                f"In which city is the headquarters of the company that {p} works for?",
                company_city[person_employer[p]], [pid[p], pid[person_employer[p]]],
                [p, person_employer[p], company_city[person_employer[p]]])),
            ("employer_founder", lambda p: (
                f"Who founded the company that employs {p}?", company_founder[person_employer[p]],
                [pid[p], pid[person_employer[p]]],
                [p, person_employer[p], company_founder[person_employer[p]]])),
            ("founder_birth", lambda c: (
                f"In which city was the founder of {c} born?", person_birth[company_founder[c]],
                [pid[c], pid[company_founder[c]]], [c, company_founder[c], person_birth[company_founder[c]]])),
            ("hq_country", lambda c: (
                f"In which country is the city where {c} has its headquarters?",
                city_country[company_city[c]], [pid[c], pid[company_city[c]]],
                [c, company_city[c], city_country[company_city[c]]]))],
        3: [("employer_hq_country", lambda p: (
                f"In which country is the headquarters city of the company {p} works for?",
                city_country[company_city[person_employer[p]]],
                [pid[p], pid[person_employer[p]], pid[company_city[person_employer[p]]]],
                [p, person_employer[p], company_city[person_employer[p]],
                 city_country[company_city[person_employer[p]]]])),
            ("employer_hq_mayor", lambda p: (
                f"Who is the mayor of the city where the employer of {p} is headquartered?",
                city_mayor[company_city[person_employer[p]]],
                [pid[p], pid[person_employer[p]], pid[company_city[person_employer[p]]]],
                [p, person_employer[p], company_city[person_employer[p]],
                 city_mayor[company_city[person_employer[p]]]])),
            ("employer_founder_birth", lambda p: (
                f"In which city was the founder of {p}'s employer born?",
                person_birth[company_founder[person_employer[p]]],
                [pid[p], pid[person_employer[p]], pid[company_founder[person_employer[p]]]],
                [p, person_employer[p], company_founder[person_employer[p]],
                 person_birth[company_founder[person_employer[p]]]]))],
    }
    subjects = {"employer": people, "birthplace": people, "hq": companies, "founder": companies,
                "employer_hq": people, "employer_founder": people, "founder_birth": companies,
                "hq_country": companies, "employer_hq_country": people, "employer_hq_mayor": people,
                "employer_founder_birth": people}
    questions: list[Question] = []
    for hops in (1, 2, 3):
        pool = [(kind, fn, s) for kind, fn in kinds[hops] for s in subjects[kind]]
        rng.shuffle(pool)
        seen: set[tuple] = set()
        made = 0
        for kind, fn, subject in pool:
            if made >= n_per_hop:
                break
            text, answer, gold, chain = fn(subject)
            if len(set(gold)) != len(gold) or len(set(chain)) != len(chain) or text in seen:  # folds back
                continue
            seen.add(text)
            questions.append(Question(id=f"q{hops}-{made:04d}", text=text, answer=answer, hops=hops,
                                      gold_doc_ids=gold, kind=kind, chain=chain))
            made += 1
    params = dict(n_people=n_people, n_companies=n_companies, n_cities=n_cities, n_countries=n_countries,
                  n_distractors=n_distractors, n_per_hop=n_per_hop)
    return SyntheticSet(passages=passages, questions=questions, seed=seed, params=params)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def multihop_questions(seed: int, n_questions: int, n_passages: int) -> list[tuple]:
    """[(question, gold answer, passages, hops)]: ``n_questions`` questions of the world of ``seed`` in a
    seeded order, each with its gold passages plus distractors from the same world (``n_passages`` in all,
    shuffled)."""
    rng = random.Random(seed)
    s = make_multihop(seed=seed)
    qs = list(s.questions)
    rng.shuffle(qs)
    out = []
    for q in qs[:n_questions]:
        gold = [s.passage(d) for d in q.gold_doc_ids]
        pool = [p for p in s.passages if p.id not in set(q.gold_doc_ids)]
        docs = gold + rng.sample(pool, max(0, n_passages - len(gold)))
        rng.shuffle(docs)
        out.append((q.text, q.answer, docs, q.hops))
    return out


# ----------------------------------------------------------------------------------- BEIR
def load_beir_split(data: Path, split: str = "train") -> tuple[dict, dict, dict]:
    """A BEIR folder as plain dicts: ``{doc id: title + newline + text}``, the queries judged in ``split``
    (``{query id: text}``) and its qrels (``{query id: {doc id: relevance}}``; lines without a numeric
    relevance, such as a header, are skipped)."""
    data = Path(data)
    corpus, queries, qrels = {}, {}, {}
    with open(data / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            o = json.loads(line)
            corpus[str(o["_id"])] = (o.get("title") or "") + "\n" + (o.get("text") or "")
    with open(data / "queries.jsonl", encoding="utf-8") as fh:
        for line in fh:
            o = json.loads(line)
            queries[str(o["_id"])] = o["text"]
    with open(data / "qrels" / f"{split}.tsv", encoding="utf-8") as fh:
        for line in fh:
            p = line.rstrip("\n").split("\t")
            if len(p) != 3 or not p[2].strip().lstrip("-").isdigit():
                continue
            qrels.setdefault(p[0], {})[p[1]] = int(p[2])
    queries = {q: queries[q] for q in qrels if q in queries}
    return corpus, queries, qrels
