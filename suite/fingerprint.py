"""Fingerprints for officers to read aloud: SHA-256 over the DER SubjectPublicKeyInfo, in hex
and as PGP words (the Juola-Zimmermann biometric word list: bytes at even offsets use the
two-syllable list, odd offsets the three-syllable list, so a swapped or dropped word is caught).
"""

from __future__ import annotations

import hashlib

__all__ = ["EVEN_WORDS", "ODD_WORDS", "display", "from_words", "parse_fingerprint",
           "spki_sha256", "to_hex", "to_words"]

# The PGP word list (public domain), index = byte value.
EVEN_WORDS = tuple("""
    aardvark absurd accrue acme adrift adult afflict ahead aimless Algol allow alone ammo
    ancient apple artist assume Athens atlas Aztec baboon backfield backward banjo beaming
    bedlamp beehive beeswax befriend Belfast berserk billiard bison blackjack blockade blowtorch
    bluebird bombast bookshelf brackish breadline breakup brickyard briefcase Burbank button
    buzzard cement chairlift chatter checkup chisel choking chopper Christmas clamshell classic
    classroom cleanup clockwork cobra commence concert cowbell crackdown cranky crowfoot crucial
    crumpled crusade cubic dashboard deadbolt deckhand dogsled dragnet drainage dreadful drifter
    dropper drumbeat drunken Dupont dwelling eating edict egghead eightball endorse endow enlist
    erase escape exceed eyeglass eyetooth facial fallout flagpole flatfoot flytrap fracture
    framework freedom frighten gazelle Geiger glitter glucose goggles goldfish gremlin guidance
    hamlet highchair hockey indoors indulge inverse involve island jawbone keyboard kickoff kiwi
    klaxon locale lockup merit minnow miser Mohawk mural music necklace Neptune newborn
    nightbird Oakland obtuse offload optic orca payday peachy pheasant physique playhouse Pluto
    preclude prefer preshrunk printer prowler pupil puppy python quadrant quiver quota ragtime
    ratchet rebirth reform regain reindeer rematch repay retouch revenge reward rhythm ribcage
    ringbolt robust rocker ruffled sailboat sawdust scallion scenic scorecard Scotland seabird
    select sentence shadow shamrock showgirl skullcap skydive slingshot slowdown snapline
    snapshot snowcap snowslide solo southward soybean spaniel spearhead spellbind spheroid
    spigot spindle spyglass stagehand stagnate stairway standard stapler steamship sterling
    stockman stopwatch stormy sugar surmount suspense sweatband swelter tactics talon tapeworm
    tempest tiger tissue tonic topmost tracker transit trauma treadmill Trojan trouble tumor
    tunnel tycoon uncut unearth unwind uproot upset upshot vapor village virus Vulcan waffle
    wallet watchword wayside willow woodlark Zulu
""".split())

ODD_WORDS = tuple("""
    adroitness adviser aftermath aggregate alkali almighty amulet amusement antenna applicant
    Apollo armistice article asteroid Atlantic atmosphere autopsy Babylon backwater barbecue
    belowground bifocals bodyguard bookseller borderline bottomless Bradbury bravado Brazilian
    breakaway Burlington businessman butterfat Camelot candidate cannonball Capricorn caravan
    caretaker celebrate cellulose certify chambermaid Cherokee Chicago clergyman coherence
    combustion commando company component concurrent confidence conformist congregate consensus
    consulting corporate corrosion councilman crossover crucifix cumbersome customer Dakota
    decadence December decimal designing detector detergent determine dictator dinosaur
    direction disable disbelief disruptive distortion document embezzle enchanting enrollment
    enterprise equation equipment escapade Eskimo everyday examine existence exodus fascinate
    filament finicky forever fortitude frequency gadgetry Galveston getaway glossary gossamer
    graduate gravity guitarist hamburger Hamilton handiwork hazardous headwaters hemisphere
    hesitate hideaway holiness hurricane hydraulic impartial impetus inception indigo inertia
    infancy inferno informant insincere insurgent integrate intention inventive Istanbul Jamaica
    Jupiter leprosy letterhead liberty maritime matchmaker maverick Medusa megaton microscope
    microwave midsummer millionaire miracle misnomer molasses molecule Montana monument mosquito
    narrative nebula newsletter Norwegian October Ohio onlooker opulent Orlando outfielder
    Pacific pandemic Pandora paperweight paragon paragraph paramount passenger pedigree Pegasus
    penetrate perceptive performance pharmacy phonetic photograph pioneer pocketful politeness
    positive potato processor provincial proximate puberty publisher pyramid quantity racketeer
    rebellion recipe recover repellent replica reproduce resistor responsive retraction
    retrieval retrospect revenue revival revolver sandalwood sardonic Saturday savagery
    scavenger sensation sociable souvenir specialist speculate stethoscope stupendous supportive
    surrender suspicious sympathy tambourine telephone therapist tobacco tolerance tomorrow
    torpedo tradition travesty trombonist truncated typewriter ultimate undaunted underfoot
    unicorn unify universe unravel upcoming vacancy vagabond vertigo Virginia visitor vocalist
    voyager warranty Waterloo whimsical Wichita Wilmington Wyoming yesteryear Yucatan
""".split())


def spki_sha256(spki_der: bytes) -> bytes:
    return hashlib.sha256(spki_der).digest()


def to_hex(digest: bytes, group: int = 2) -> str:
    """Colon-free, grouped upper-case hex: ``A1B2 C3D4 ...`` (groups of ``group`` bytes)."""
    h = digest.hex().upper()
    step = group * 2
    return " ".join(h[i:i + step] for i in range(0, len(h), step))


def to_words(data: bytes) -> list[str]:
    return [(EVEN_WORDS if i % 2 == 0 else ODD_WORDS)[b] for i, b in enumerate(data)]


def display(digest: bytes, title: str = "SHA-256(SPKI)", indent: str = "  ",
            width: int = 0) -> list[str]:
    """The one layout every command prints a fingerprint in, for an officer to read aloud and
    compare with another screen: the grouped hex after ``title``, then the PGP words, 16 a
    line, under it (``width``: the label column, to line up with the lines around it)."""
    words = to_words(digest)
    width = max(width, len(title))
    return [f"{indent}{title:<{width}} {to_hex(digest)}",
            f"{indent}{'words':<{width}} {' '.join(words[:16])}",
            f"{indent}{'':<{width}} {' '.join(words[16:])}"]


def from_words(words: list[str] | str) -> bytes:
    """Inverse of :func:`to_words`; a word in the wrong position or unknown raises ValueError."""
    if isinstance(words, str):
        words = words.replace("-", " ").split()
    even = {w.lower(): i for i, w in enumerate(EVEN_WORDS)}
    odd = {w.lower(): i for i, w in enumerate(ODD_WORDS)}
    out = bytearray()
    for pos, word in enumerate(words):
        table = even if pos % 2 == 0 else odd
        try:
            out.append(table[word.lower()])
        except KeyError:
            raise ValueError(f"word {pos + 1} {word!r} is not a PGP word for that "
                             "position") from None
    return bytes(out)


def parse_fingerprint(text: str) -> bytes:
    """Accept a SHA-256 fingerprint as hex (spaces and colons allowed) or as 32 PGP words."""
    cleaned = text.replace(":", "").replace(" ", "").strip()
    try:
        raw = bytes.fromhex(cleaned)
    except ValueError:
        raw = from_words(text)
    if len(raw) != 32:
        raise ValueError(f"a SHA-256 fingerprint has 32 bytes, got {len(raw)}")
    return raw
