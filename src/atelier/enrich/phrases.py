"""Grounded RE phrases: candidate phrases cut from the product's own text, then assigned to RE fields.

Free generation by the 270M model copied the guide's words (gold RE precision 0.02). Here every RE
phrase is a span of the title or description, so nothing the listing does not say can come out:

1. ``candidate_phrases``: the description is cut into sentences, then into clauses at the words
   that join a catalogue sentence's parts (``with``, ``and``, commas, ``in`` after the garment name,
   ``that``, ``for``...). Each clause loses its leading articles and is kept when it has one to four
   content words. A clause carries a *role* from where it stands: the garment noun phrase that opens
   the first sentence (``name``), the material phrase after its ``in`` (``material``), the rest
   (``part``); the title gives ``title`` candidates (its garment noun and the word before it). Single
   adjectives split off by commas are glued back to the next clause ("airy, patterned viscose weave"),
   and print words inside a material phrase are split out ("printed cotton jersey" -> "printed" +
   "cotton jersey").
2. An assigner gives each candidate one RE field or drops it:

   - ``assign_rules`` (backend ``phrases``): word lists per field (fabric words -> fiber_composition,
     construction words -> detail, fit words -> fit, ...) and the roles;
   - ``assign_minilm`` (``phrases-minilm``): the nearest field prototype in MiniLM space;
   - the LLM (``phrases-ll``, ``phrases-ll-lora``, module ``phrase_llm``): the log-likelihood of each
     field's one-token name after the question "What does <phrase> describe?".

Which assigner is the default is decided on the gold set's train split and reported on its test
split (``benchmarks/bench_extraction.py gold-re``); ``field_sources.toml``'s ``re`` names it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from atelier.enrich.base import ExtractionRequest, register
from atelier.enrich.fieldwise import FieldwiseExtractor
from atelier.enrich.prompt import RE_PHRASE_CHARS, UNKNOWN_LABEL, label_maps
from atelier.enrich.rules import keyword_values
from atelier.schema import Schema

if TYPE_CHECKING:
    from atelier.config import Settings

__all__ = ["DROP_WORDS", "FIELD_WORDS", "FIXED_ROLES", "PHRASES_VERSION", "PROTOTYPES", "RE_FIELD_WORDS", "Candidate",
           "MiniLMJudge", "MiniLMPhraseExtractor", "PhraseExtractor", "assign", "assign_rules",
           "candidate_phrases", "grounded_re"]

PHRASES_VERSION = "ph-v1"  # part of every phrase backend's model id: bump when cutting or rules change
MAX_WORDS = 4  # the gold guide's longest phrase
MAX_PER_FIELD = 4

# -- word lists ---------------------------------------------------------------------------------------------------

_FABRIC = {
    "cotton", "jersey", "denim", "fabric", "weave", "woven", "knit", "knitted", "wool", "linen", "viscose",
    "satin", "chiffon", "mesh", "leather", "suede", "velour", "velvet", "fleece", "corduroy", "twill", "crêpe",
    "crepe", "flannel", "polyester", "modal", "lyocell", "tencel", "silk", "cashmere", "mohair", "alpaca", "lace",
    "tulle", "organza", "poplin", "canvas", "chambray", "sweatshirt", "pile", "teddy", "nylon", "elastane",
    "microfibre", "piqué", "pique", "rib-knit", "fine-knit", "chunky-knit", "merino", "lurex", "sequins",
    "seersucker", "muslin", "georgette", "plush", "terry", "towelling", "felt", "shell", "down", "metal",
    "straw", "rubber", "textile", "material", "quality", "yarn", "blend", "broderie", "anglaise", "jacquard",
    "faux", "imitation", "glitter", "lamé", "bouclé", "boucle", "rib", "ribbed", "scuba", "neoprene", "softshell",
    "cord", "crinkled", "pointelle", "waffle", "chenille", "oxford", "dobby", "sateen", "tweed", "gabardine",
}
_FABRIC_HEAD = {"fabric", "weave", "jersey", "denim", "knit", "wool", "linen", "viscose", "satin", "chiffon",
                "mesh", "leather", "suede", "velour", "velvet", "fleece", "corduroy", "twill", "crêpe", "crepe",
                "flannel", "polyester", "silk", "cashmere", "mohair", "lace", "tulle", "poplin", "canvas", "cotton",
                "chambray", "quality", "material", "yarn", "blend", "jacquard", "piqué", "pique", "lyocell", "modal",
                "seersucker", "muslin", "terry", "towelling", "felt", "metal", "straw", "rubber", "textile",
                "sequins", "plush", "pile", "teddy", "nylon", "tweed", "gabardine", "sateen", "cord", "rib",
                "finish", "inside", "georgette", "organza", "microfibre", "alpaca", "merino", "scuba", "softshell"}
_PRINT = {"printed", "print", "patterned", "pattern", "motif", "motifs", "striped", "stripes", "stripe", "checked",
          "check", "checks", "floral", "dots", "dotted", "spotted", "spots", "leopard", "zebra", "camouflage",
          "camo", "tie-dye", "tie-dyed", "paisley", "graphic", "logo", "lettering", "text", "glittery", "argyle",
          "jacquard-knit", "houndstooth", "gingham", "tartan", "marl", "marled", "melange", "mélange", "ombré",
          "dip-dyed", "animal", "all-over", "allover", "print-", "design", "designs", "pinstripe", "pinstriped"}
_FIT = {"fit", "waist", "legs", "leg", "silhouette", "oversized", "relaxed", "loose", "fitted", "slim", "skinny",
        "straight", "wide", "tapered", "flared", "boxy", "regular", "cropped", "high-waisted", "low-waisted",
        "voluminous", "straight-cut", "a-line", "bodycon", "figure-fit", "figure-hugging", "body", "shoulders",
        "longline", "mid-waist", "baggy"}
_DETAIL = {
    "zip", "zips", "zipped", "button", "buttons", "buttoned", "buttoning", "press-stud", "press-studs", "studs",
    "pocket", "pockets", "collar", "cuffs", "cuff", "hem", "hems", "drawstring", "hood", "strap", "straps",
    "tie", "ties", "belt", "appliqué", "appliqués", "applique", "flounce", "flounces", "frill", "frills", "ruffle",
    "ruffles", "pleat", "pleats", "pleated", "slit", "slits", "yoke", "gathers", "gathered", "elastication",
    "elasticated", "ribbing", "seam", "seams", "fly", "fastening", "fastener", "fasteners", "hook-and-eye",
    "opening", "lining", "lined", "trim", "trims", "trimmed", "embroidery", "embroidered", "sequin", "beads",
    "beaded", "rhinestones", "bow", "bows", "fringes", "fringe", "tassels", "loop", "loops", "tab", "tabs",
    "turn-ups", "gores", "toe", "toes", "heel", "heels", "sole", "soles", "insoles", "insole", "lacing", "laces",
    "eyelets", "rivets", "studded", "smocking", "smocked", "shirring", "cut-out", "cut-outs", "cutout",
    "cups", "underwired", "padded", "inserts", "wrapover", "wrap", "sleeves", "sleeve", "neckline", "v-neck",
    "neck", "back", "shoulder", "pendant", "pendants", "clasp", "buckle", "handle", "handles", "chain",
    "creases", "piping", "stitching", "topstitching", "darts", "vent", "vents", "panel", "panels", "lapels",
    "flap", "flaps", "hanger", "label", "badge", "patch", "patches", "plaquet", "placket", "ribbed", "tucks",
    "turn-down", "stand-up", "decorative", "detachable", "adjustable", "concealed", "covered", "kangaroo",
    "scalloped", "raw", "distressed", "ripped", "worn", "trainer", "velcro", "hook", "hooks", "drawstrings",
}
_VIBE = {"comfortable", "flattering", "soft", "cosy", "cozy", "playful", "sparkly", "feminine", "elegant",
         "cool", "cute", "casual", "sporty", "romantic", "sexy", "chic", "effortless", "edgy", "glamorous",
         "luxurious", "dreamy", "breezy", "easy"}
_OCCASION = {"sports", "sport", "running", "training", "yoga", "beach", "party", "wedding", "office", "work",
             "evening", "outdoor", "hiking", "swimming", "festival", "formal", "casual", "travel", "school",
             "gym", "football", "tennis", "cycling", "ski", "skiing", "lounge", "loungewear", "sleep",
             "nightwear", "holiday", "summer", "winter"}
_STYLE = {"retro", "vintage", "classic", "90s", "80s", "70s", "y2k", "utility", "boho", "preppy", "minimalist",
          "western", "military", "biker", "cargo", "sporty", "streetwear", "grunge", "ethnic", "tailored",
          "5-pocket"}
_COLOR = {"black", "white", "blue", "navy", "red", "green", "pink", "grey", "gray", "beige", "brown", "yellow",
          "purple", "orange", "maroon", "olive", "khaki", "cream", "gold", "silver", "copper", "mustard", "teal",
          "turquoise", "burgundy", "lavender", "lilac", "peach", "coral", "magenta", "rust", "tan", "charcoal",
          "off-white", "multi", "coloured", "colored", "multicoloured", "bronze", "nude", "mauve", "sea", "fluorescent",
          "neon", "metallic", "dark", "light", "skin", "taupe", "steel", "mint", "rose", "wine", "camel",
          "ecru", "indigo", "violet"}
_META = {"lined", "unlined", "length", "long", "short", "knee-length", "calf-length", "ankle-length", "mid-calf",
         "recycled", "organic", "sustainable", "fast-drying", "breathable", "water-repellent", "waterproof",
         "windproof", "wadded", "padded", "size", "sizes", "cm", "mm", "heel", "pack", "set", "reversible",
         "functional", "insulating", "non-slip", "anti-slip", "removable", "petite", "tall", "maternity",
         "backless", "sleeveless", "strapless", "double-layered", "quilted", "thermal", "lightweight", "thick",
         "thin", "warm", "stretch", "large", "small", "mini", "maxi", "midi", "uv", "dry", "quick-drying",
         "moisture-wicking", "technology", "function"}
_PLAIN_COLOR = {"black", "white", "gray", "grey", "red", "pink", "orange", "beige", "brown", "yellow", "green",
                "khaki", "mint", "blue", "navy", "purple", "lavender", "wine", "neon", "gold", "silver", "multi"}
# Words of a bare title (Myntra) that name a fabric or an occasion.
_TITLE_FABRIC = {"fleece", "leather", "denim", "crepe", "linen", "silk", "cotton", "wool", "woollen", "velvet",
                 "satin", "chiffon", "georgette", "knit", "knitted", "suede", "corduroy", "jute", "canvas",
                 "mesh", "lace", "khadi", "mangalgiri", "chanderi", "cashmere"}
_TITLE_OCCASION = {"casual", "sports", "sport", "formal", "party", "wedding", "training", "running", "football",
                   "yoga", "ethnic", "festive", "beach", "swim", "travel", "office", "cricket", "basketball",
                   "tennis", "golf", "outdoor", "trekking", "evening"}
# Body parts and garment parts that carry nothing on their own ("sleeves" split off "front and sleeves").
_BARE = {"front", "back", "sleeves", "sleeve", "hem", "hems", "cuffs", "neckline", "sides", "side", "top",
         "bottom", "waist", "shoulders", "neck", "inside", "outside", "leg", "legs", "body", "one", "two", "three",
         "pair", "them", "it", "this", "that", "room", "movement", "size", "sizes", "style", "design", "piece",
         "colour", "color", "shape", "model", "brand", "item", "items", "parts", "part", "top edge", "edges",
         "edge", "details", "detail", "lining", "trim", "trims", "cm", "length", "centre", "center", "pockets",
         "zip", "button", "buttons", "opening", "seam", "seams", "collar", "hood"}
_STOP_LEAD = {"a", "an", "the", "and", "with", "in", "on", "at", "of", "to", "for", "from", "by", "its", "their",
              "has", "have", "is", "are", "which", "that", "also", "both", "all", "some", "plus", "or", "made",
              "available", "this", "these", "it", "as"}
_GARMENT_EXTRA = {
    "top", "tops", "dress", "dresses", "skirt", "trousers", "jeans", "shorts", "jacket", "coat", "blazer",
    "shirt", "blouse", "jumper", "cardigan", "hoodie", "sweatshirt", "t-shirt", "tshirt", "tshirts", "t-shirts",
    "vest", "tights", "socks", "leggings", "joggers", "bra", "bralette", "briefs", "thong", "boxer", "boxers",
    "trunks", "body", "bodysuit", "swimsuit", "bikini", "pyjamas", "nightdress", "nightshirt", "robe",
    "dressing", "gown", "set", "sets", "scarf", "hat", "cap", "beanie", "gloves", "mittens", "bag", "bags",
    "belt", "earrings", "necklace", "necklaces", "bracelet", "bracelets", "ring", "rings", "sunglasses",
    "watch", "wallet", "purse", "shoes", "shoe", "sneakers", "trainers", "boots", "sandals", "slippers",
    "flip-flops", "pumps", "loafers", "ballet", "flats", "heels", "kaftan", "kimono", "tunic", "poncho",
    "parka", "gilet", "waistcoat", "anorak", "jumpsuit", "playsuit", "dungarees", "romper", "camisole", "tank",
    "kurta", "kurtas", "kurti", "saree", "sari", "churidar", "salwar", "dupatta", "lehenga", "capri", "capris",
    "track", "tracksuit", "sweater", "pullover", "polo", "tee", "shirtdress", "bandeau", "hairband",
    "scrunchie", "hair", "clip", "clips", "headband", "alice", "band", "tie", "bow", "handbag", "backpack",
    "clutch", "pouch", "case", "cover", "umbrella", "keyring", "mask", "slip", "camisoles", "leotard",
    "overalls", "chinos", "culottes", "skort", "bermuda", "bermudas", "blazers", "bustier", "corset", "vests",
    "jackets", "coats", "trouser", "pants", "pant", "jeggings", "flip", "flops", "loafer",
    "sneaker", "boot", "sandal", "slipper", "heel", "stilettos", "wedges", "espadrilles", "moccasins",
    "stockings", "hold-ups", "sock", "slippersocks", "trainer", "swim", "swimwear", "sarong", "beach",
    "watches", "belts", "ties", "cufflinks", "bangle", "bangles", "anklet", "pendant", "brooch", "hairclip",
    "sunglass", "eyewear", "spectacle", "frames", "tote", "shopper", "satchel", "sling", "duffle", "laptop",
    "messenger", "fragrance", "perfume", "deodorant", "lipstick", "nail", "polish", "kajal", "eyeliner",
    "mascara", "foundation", "lip", "gloss", "nightwear", "lounge", "innerwear", "trunk", "brief", "panties",
    "hipster", "hipsters", "shapewear", "stole", "shawl", "muffler", "cape", "bolero", "shrug", "top-",
}


def _garment_words(schema: Schema) -> set[str]:
    words = set(_GARMENT_EXTRA)
    for name in ("category",):
        for label in label_maps(schema)[name]:
            words |= set(label.split())
        words |= {w for alias in schema.std[name].synonyms for w in alias.split()}
    return words


# -- cutting ------------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+(?:[-'/.½][a-z0-9]+)*%?|&")
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(])|\n+")
# Clause boundaries inside a sentence (kept as separate pieces).
_SPLIT = re.compile(
    r",|;|:|\s+[-–—]\s+|\(|\)|(?<![\w-])(?:with|and|that|which|for|to create|to give|so|but|or|while|plus|"
    r"as well as|except|featuring|has|have|is|are|gives|give|creates|create|made|where)(?![\w-])", re.IGNORECASE)
_MATERIAL_END = re.compile(r"(?<![\w-])with(?![\w-])|;|\(|\s+[-–—]\s+", re.IGNORECASE)
_CONTENT_STOP = {"a", "an", "the", "and", "or", "with", "in", "at", "on", "of", "to", "for", "from", "by"}
_IN = re.compile(r"\s+in\s+(?:an?\s+|the\s+)?", re.IGNORECASE)


@dataclass(frozen=True)
class Candidate:
    """One phrase cut from the product text, with where it came from."""

    text: str  # lower case, 1-4 words
    role: str  # name | material | part | title
    sentence: int  # index of the sentence (-1: the title)


def _clean(text: str) -> str:
    words = _WORD.findall(text.lower().replace("™", "").replace("®", ""))
    while words and words[0] in _STOP_LEAD:
        words = words[1:]
    while words and words[-1] in _STOP_LEAD:
        words = words[:-1]
    return " ".join(words)


def _pieces(sentence: str) -> list[str]:
    """A sentence cut at its joining words; one-word adjectives glued to the next piece."""
    raw = [p.strip() for p in _SPLIT.split(sentence) if p and p.strip()]
    out: list[str] = []
    glue = ""
    for piece in raw:
        text = _clean(piece)
        if not text:
            continue
        if glue:
            text = f"{glue} {text}"
            glue = ""
        words = text.split()
        # "airy," / "wide," / "soft," before another piece: an adjective of what follows
        if len(words) == 1 and words[0] not in _GARMENT_EXTRA and words[0] not in _DETAIL and \
                words[0] not in _FABRIC_HEAD and piece.rstrip().endswith(tuple("abcdefghijklmnopqrstuvwxyz")) and \
                sentence[sentence.lower().find(piece.lower()) + len(piece):].lstrip().startswith(","):
            glue = text
            continue
        out.append(text)
    if glue:
        out.append(glue)
    return out


def _split_material(text: str) -> list[tuple[str, str]]:
    """A material phrase with its print words split out: [(phrase, role)]."""
    words = text.split()
    prints = [w for w in words if w in _PRINT]
    rest = [w for w in words if w not in _PRINT]
    out = []
    if rest:
        out.append((" ".join(rest), "material"))
    if prints:
        out.append((" ".join(prints), "print"))
    return out


def _modifiers(name: str) -> list[tuple[str, str]]:
    """Length, fit and use words that open a garment name ("Short, wide top"): [(word, role)]."""
    out = []
    for w in name.split()[:-1]:
        if w.endswith("-length") or w in ("long", "short", "padded", "lined", "petite", "backless", "sleeveless",
                                          "double-layered", "quilted", "reversible"):
            out.append((w, "name_meta"))
        elif w in _FIT and w not in ("body", "shoulders", "legs", "leg", "waist", "fit"):
            out.append((w, "name_fit"))
        elif w in _OCCASION and w not in ("summer", "winter", "beach", "holiday", "sleep", "nightwear"):
            out.append((w, "name_occasion"))
    return out


def candidate_phrases(title: str, description: str, schema: Schema | None = None) -> list[Candidate]:
    """Phrases of one to four content words cut from the title and description (see the module doc)."""
    from atelier.schema import load_schema

    schema = schema or load_schema()
    garments = _garment_words(schema)
    out: list[Candidate] = []
    seen: set[tuple[str, str]] = set()

    def add(text: str, role: str, sentence: int) -> None:
        text = text.strip()
        words = text.split()
        content = [w for w in words if w not in _CONTENT_STOP]
        if not content or len(content) > MAX_WORDS or len(text) > RE_PHRASE_CHARS or (text, role) in seen:
            return
        if all(w in _BARE or w in _STOP_LEAD or w.isdigit() for w in words):
            return
        seen.add((text, role))
        out.append(Candidate(text, role, sentence))

    def add_material(text: str, si: int) -> None:
        for piece in _pieces(text):
            for phrase, role in _split_material(piece):
                add(phrase, role, si)

    sentences = [s.strip() for s in _SENT.split(description.strip()) if s.strip()] if description else []
    for si, sentence in enumerate(sentences):
        body = sentence.rstrip(".!?")
        m = _IN.search(body)
        first_with = _MATERIAL_END.search(body)
        if si == 0 and m and m.start() > 0 and (first_with is None or m.start() < first_with.start()):
            # "<garment> in <material> with ...": the name before " in ", the material up to "with"
            name = _clean(" ".join(_pieces(body[:m.start()])))
            add(name, "name", si)
            for word, role in _modifiers(name):
                add(word, role, si)
            end = _MATERIAL_END.search(body, m.end())
            add_material(body[m.end():end.start() if end else len(body)], si)
            pieces = _pieces(body[end.start():]) if end else []
        elif si == 0:
            head, *_ = _SPLIT.split(body, maxsplit=1)
            name = _clean(head)
            if any(w in garments for w in name.split()):
                add(name, "name", si)
                for word, role in _modifiers(name):
                    add(word, role, si)
                pieces = _pieces(body[len(head):])
            else:
                pieces = _pieces(body)
        else:
            pieces = _pieces(body)
        for piece in pieces:
            # "Shorts in lightweight sweatshirt fabric" in a later sentence: a part and its material
            mm = _IN.search(f" {piece}")
            if mm and any(w in _FABRIC_HEAD for w in f" {piece}"[mm.end():].split()):
                add(_clean(f" {piece}"[:mm.start()]), "part", si)
                add_material(f" {piece}"[mm.end():], si)
            else:
                add(piece, "part", si)
    # Title: its garment noun with the word before it ("Siri volume blouse" -> "volume blouse").
    twords = _WORD.findall(title.lower())
    named = {w for c in out if c.role == "name" for w in c.text.split()}
    for i in range(len(twords) - 1, -1, -1):
        if twords[i] in garments and len(twords[i]) > 2:
            prev = twords[i - 1] if i > 0 else ""
            keep = prev.isalpha() and len(prev) > 3 and prev not in _STOP_LEAD and prev not in _COLOR
            phrase = f"{prev} {twords[i]}" if keep else twords[i]
            if keep or twords[i] not in named:
                add(phrase, "title", -1)
            break
    if not description:  # a title alone (Myntra): its colour, print, fabric, fit and occasion words too
        i = 0
        while i < len(twords):  # runs of colour words, "&" / "and" inside: "navy blue", "white & green"
            if twords[i] in _COLOR:
                j = i
                while j + 1 < len(twords) and (twords[j + 1] in _COLOR or (
                        twords[j + 1] in ("&", "and") and j + 2 < len(twords) and twords[j + 2] in _COLOR)):
                    j += 1
                run = twords[i:j + 1]
                # a bare STD colour ("blue", "grey") adds nothing to the STD field: the guide leaves it out
                if len(run) > 1 or (run[0] not in _PLAIN_COLOR and run[0] not in ("light", "dark")):
                    add(" ".join(run), "title_color", -1)
                i = j + 1
            else:
                i += 1
        for w in twords:
            if w in _PRINT and w not in ("design", "designs", "text", "logo"):
                add(w, "title_print", -1)
            elif w in _TITLE_FABRIC:
                add(w, "title_fabric", -1)
            elif w in _TITLE_OCCASION:
                add(w, "title_occasion", -1)
        for i in range(len(twords) - 1):
            if twords[i + 1] == "fit":
                add(f"{twords[i]} fit", "title_fit", -1)
    return out


# -- assignment by word lists ---------------------------------------------------------------------------------------

RE_FIELD_WORDS: dict[str, set[str]] = {
    "fiber_composition": _FABRIC, "print": _PRINT, "fit": _FIT, "detail": _DETAIL, "vibe": _VIBE,
    "occasion": _OCCASION, "style": _STYLE, "color": _COLOR, "specification.metadata": _META,
}


_NECK_SLEEVE = {"neckline", "v-neck", "neck", "sleeves", "sleeve", "collar", "polo-neck", "turtleneck"}
_PLAIN_NECK_SLEEVE = {"round", "long", "short", "3/4-length", "cap", "v-neck", "wide", "narrow", "low", "high",
                      "long-sleeved", "short-sleeved", "deep", "square", "boat", "crew", "sleeveless", "raglan",
                      "puff", "butterfly", "balloon", "dropped", "polo-neck", "turtleneck"}


def _rule_field(c: Candidate, garments: set[str], schema: Schema) -> str | None:
    """The RE field a candidate belongs to by its role and word lists, or None (dropped)."""
    words = c.text.split()
    head = words[-1]
    if c.role in FIXED_ROLES:
        return FIXED_ROLES[c.role]
    if c.role == "name":
        return "category_specification" if any(w in garments for w in words) else None
    wset = set(words)
    if len(words) == 1 and words[0] in _VIBE:
        return "vibe"
    if len(words) == 1 and words[0] in _META:
        return "specification.metadata"
    if wset & {"cm", "mm", "size", "sizes", "recycled", "organic", "unlined", "lined", "lining", "linings"} or \
            (any(w.endswith("-length") for w in words) and not wset & _DETAIL):
        if head in _FABRIC_HEAD and not wset & {"lined", "lining", "linings", "unlined"}:
            return "fiber_composition"
        return "specification.metadata"
    if head in _FABRIC_HEAD:
        return "fiber_composition"
    if c.text.endswith("brushed inside"):
        return "fiber_composition"
    if head in _NECK_SLEEVE and all(w in _PLAIN_NECK_SLEEVE or w in _NECK_SLEEVE for w in words):
        return None  # a plain neckline or sleeve length: STD fields say it
    if head in _DETAIL or (words[0] in _DETAIL and head not in _META):
        return "detail"
    if head in _FIT or (words[0] in _FIT and head in {"fit", "waist", "legs", "leg", "silhouette", "shoulders"}):
        return "fit"
    if wset & _PRINT and not wset & _FABRIC_HEAD:
        return "print"
    if wset & _OCCASION and len(words) <= 2:
        return "occasion"
    if wset & _STYLE:
        return "style"
    if wset & _META:
        return "specification.metadata"
    if head in garments and c.sentence == 0:
        return "category_specification"
    return None


# Roles whose field the cutting itself decides; the assigners judge only the "part" candidates.
FIXED_ROLES = {"title": "category_specification", "title_color": "color", "title_print": "print",
               "title_fit": "fit", "title_fabric": "fiber_composition", "title_occasion": "occasion",
               "print": "print", "material": "fiber_composition", "name_meta": "specification.metadata",
               "name_fit": "fit", "name_occasion": "occasion"}
# The one-word name of each RE field an LLM or MiniLM assigner chooses from; "sleeves" and "neckline"
# (STD fields say them) drop the phrase.
FIELD_WORDS = {"category_specification": "garment", "fiber_composition": "fabric", "color": "colour",
               "print": "pattern", "detail": "detail", "style": "style", "vibe": "mood", "fit": "fit",
               "occasion": "occasion", "specification.metadata": "other"}
DROP_WORDS = ("sleeves", "neckline")


def assign(cands: list[Candidate], schema: Schema,
           judge: Callable[[list[Candidate]], list[str | None]] | None = None) -> dict[str, list[str]]:
    """RE field -> phrases. Fixed roles (name, material, title words) keep the field their place gives; ``judge``
    (default: the word lists) gives each "part" candidate a field or None (dropped)."""
    garments = _garment_words(schema)
    fields: list[str | None] = [None] * len(cands)
    parts = []
    for i, c in enumerate(cands):
        if judge is None or c.role != "part":
            fields[i] = _rule_field(c, garments, schema)
        else:
            parts.append(i)
    if parts and judge is not None:
        for i, f in zip(parts, judge([cands[i] for i in parts]), strict=True):
            fields[i] = f
    out: dict[str, list[str]] = {}
    for c, field in zip(cands, fields, strict=True):
        if field is None or field not in schema.re:
            continue
        bucket = out.setdefault(field, [])
        if len(bucket) < MAX_PER_FIELD and c.text not in bucket:
            bucket.append(c.text)
    return out


def assign_rules(cands: list[Candidate], schema: Schema) -> dict[str, list[str]]:
    """RE field -> phrases, by word lists and roles (candidates no list claims are dropped)."""
    return assign(cands, schema)


def grounded_re(title: str, description: str, schema: Schema | None = None,
                re_fields: list[str] | None = None) -> dict[str, list[str]]:
    """RE field -> phrases of one product: ``candidate_phrases`` assigned by ``assign_rules`` (the ``phrases``
    method of ``bench_extraction.py gold-re``), every field of ``re_fields`` (default: all RE fields) present."""
    from atelier.schema import load_schema

    schema = schema or load_schema()
    got = assign_rules(candidate_phrases(title, description, schema), schema)
    return {f: got.get(f, []) for f in (list(schema.re) if re_fields is None else re_fields)}


# -- backends -----------------------------------------------------------------------------------------------------


@register("phrases")
class PhraseExtractor(FieldwiseExtractor):
    """RE phrases cut from the product text and assigned by word lists; STD fields by keyword rules."""

    concurrency = 4

    @classmethod
    def from_settings(cls, settings: Settings) -> PhraseExtractor:
        """No settings: rules only."""
        return cls()

    @property
    def model_id(self) -> str:
        """``phrases:rules@<version>/<schema version>``."""
        return f"phrases:rules@{PHRASES_VERSION}/{self.schema.version}"

    def pick(self, title: str, description: str, fields: list[str]) -> dict[str, str]:
        """STD fields: the schema's keyword rules (the hybrid asks this backend for RE only)."""
        return keyword_values(f"{title} {description}", self.schema, fields)

    def phrases(self, title: str, description: str, re_fields: list[str]) -> dict[str, list[str]]:
        """RE field -> grounded phrases."""
        return grounded_re(title, description, self.schema, re_fields)

    def complete(self, request: ExtractionRequest) -> str:
        """Keyword STD values plus grounded RE phrases."""
        answer: dict[str, Any] = json.loads(super().complete(request))
        ctx = request.context
        re_fields = list(ctx.get("re_fields", []))
        if re_fields:
            answer["re"] = self.phrases(str(ctx.get("title", "")), str(ctx.get("description", "")), re_fields)
        for name in [f for f in ctx.get("fields", []) if f in self.schema.std]:
            answer.setdefault(name, UNKNOWN_LABEL)
        return json.dumps(answer)


# Prototype phrases per RE field for the MiniLM assigner: the gold guide's examples and the schema's RE
# descriptions (never the gold annotations); the last group's nearest phrases are dropped (STD fields).
PROTOTYPES: dict[str, list[str]] = {
    "category_specification": ["strap top", "wrap dress", "cargo trousers", "5-pack trainer socks", "trench coat",
                               "garment name"],
    "fiber_composition": ["cotton jersey", "soft sweatshirt fabric", "fine-knit", "airy woven fabric",
                          "cotton blend", "soft brushed", "crisp poplin", "material"],
    "color": ["light denim blue", "washed black", "dusty rose", "ecru", "forest green", "colour"],
    "print": ["printed motif", "narrow stripes", "glittery text print", "small floral", "pinstripe", "logo print"],
    "detail": ["press-stud fastening", "elasticated waist", "ribbed cuffs", "adjustable straps", "covered buttons",
               "raw hem", "contrast stitching"],
    "style": ["5-pocket", "90s", "utility", "gorpcore", "quiet luxury", "y2k", "coquette"],
    "vibe": ["soft", "playful", "sparkly", "effortless", "edgy", "cosy"],
    "fit": ["relaxed fit", "high waist", "wide legs", "fitted waist", "body-skimming", "boxy"],
    "occasion": ["sports", "beach", "party", "beach wedding guest", "office", "festival"],
    "specification.metadata": ["lined", "calf-length", "fast-drying", "organic cotton", "long", "winter wear",
                               "layering piece"],
    "": ["long sleeves", "short sleeves", "round neckline", "v-neck", "the front", "the back"],
}


class MiniLMJudge:
    """Each part candidate goes to the RE field of its nearest prototype (cosine), or is dropped below ``floor``."""

    def __init__(self, floor: float = 0.5, encode: Callable[[list[str]], Any] | None = None) -> None:
        self.floor = floor  # tuned on the gold train split (bench_extraction.py gold-re)
        self._encode = encode
        self._protos: tuple[list[str], Any] | None = None
        self._memo: dict[str, Any] = {}  # phrase -> vector

    def encode(self, texts: list[str]) -> Any:
        """L2-normalised MiniLM vectors."""
        if self._encode is not None:
            return self._encode(texts)
        from atelier.text import encode_texts

        return encode_texts(texts)

    def sims(self, phrases: list[str]) -> tuple[list[str], Any]:
        """(field of each prototype, cosine of each phrase to each prototype)."""
        import numpy as np

        if self._protos is None:
            owners = [f for f, ps in PROTOTYPES.items() for _ in ps]
            self._protos = (owners, self.encode([p for ps in PROTOTYPES.values() for p in ps]))
        owners, vecs = self._protos
        new = [p for p in dict.fromkeys(phrases) if p not in self._memo]
        if new:
            if len(self._memo) > 100_000:  # bounded: a catalogue run repeats few phrases
                self._memo.clear()
            self._memo.update(zip(new, self.encode(new), strict=True))
        return owners, np.stack([self._memo[p] for p in phrases]) @ vecs.T  # (phrases, prototypes)

    def __call__(self, cands: list[Candidate]) -> list[str | None]:
        """The field of each candidate, or None."""
        owners, sims = self.sims([c.text for c in cands])
        best = sims.argmax(axis=1)
        return [owners[int(j)] or None if sims[i, j] >= self.floor else None for i, j in enumerate(best)]


@register("phrases-minilm")
class MiniLMPhraseExtractor(PhraseExtractor):
    """``phrases`` with the part candidates assigned by MiniLM similarity to prototype phrases."""

    def __init__(self, schema: Schema | None = None, judge: MiniLMJudge | None = None) -> None:
        super().__init__(schema)
        self.judge = judge or MiniLMJudge()

    @property
    def model_id(self) -> str:
        """``phrases-minilm:all-MiniLM-L6-v2@<version>/<floor>``."""
        from atelier.text import ENCODER_ID

        return f"phrases-minilm:{ENCODER_ID}@{PHRASES_VERSION}/{self.judge.floor}/{self.schema.version}"

    def phrases(self, title: str, description: str, re_fields: list[str]) -> dict[str, list[str]]:
        """RE field -> grounded phrases, parts judged by MiniLM."""
        got = assign(candidate_phrases(title, description, self.schema), self.schema, self.judge)
        return {f: got.get(f, []) for f in re_fields}
