"""Deterministic English text generator for the built-in synthetic corpus.

Sentences are drawn from templates in the style of voice-assistant commands, numbers, dates, times,
money, addresses, names and everyday speech. Everything that a speaker would say as words is written
as words ("twenty five dollars and ten cents", "march third", "seven thirty p m"), so generated text
is already in normalized form: lowercase a-z, apostrophes inside words, single spaces.

Public helpers:

* :func:`normalize_text` - the transcript normalization used across harken (also by the tokenizer).
* :func:`number_to_words`, :func:`ordinal_words`, :func:`year_words` - spoken forms of numbers.
* :func:`generate_sentences` - ``n`` unique sentences from a seed.
* :func:`make_splits` - disjoint sentence lists per split.
* :func:`vocab_stats` - train vocabulary size and OOV rate of other splits.
"""

from __future__ import annotations

import random
import re
from typing import Callable, Iterable, Mapping

from harken.text.normalize import (  # noqa: F401  (re-exported for the corpus API)
    _ONES,
    _TENS,
    digits_words,
    normalize_text,
    number_to_words,
    ordinal_words,
    year_words,
)

# --------------------------------------------------------------------------------------------------
# word lists (written for harken)
# --------------------------------------------------------------------------------------------------

FIRST_NAMES = """
james mary robert patricia john jennifer michael linda david elizabeth william barbara richard susan
joseph jessica thomas sarah charles karen christopher lisa daniel nancy matthew betty anthony sandra
mark margaret donald ashley steven kimberly paul emily andrew donna joshua michelle kenneth carol
kevin amanda brian melissa george deborah timothy stephanie ronald rebecca edward sharon jason laura
jeffrey cynthia ryan amy jacob kathleen gary angela nicholas dorothy eric helen jonathan anna stephen
brenda larry pamela justin emma scott nicole brandon samantha benjamin katherine samuel christine
gregory rachel alexander catherine patrick carolyn frank janet raymond maria jack olivia dennis heather
jerry diane tyler julie aaron joyce jose victoria adam kelly nathan christina henry lauren zachary
joan douglas evelyn peter judith kyle megan noah andrea ethan cheryl jeremy hannah walter jacqueline
christian martha keith gloria roger teresa terry ann austin sara sean madison gerald frances carl
kathryn harold janice dylan jean arthur abigail lawrence alice jordan judy jesse sophia bryan grace
billy denise bruce amber gabriel doris joe marilyn logan danielle albert beverly willie isabella alan
theresa eugene diana russell natalie vincent brittany bobby charlotte johnny marie bradley kayla roy
alexis louis lori liam mia oliver ava lucas chloe mason ella elijah zoe owen nora caleb leah isaac
hazel miles ruby felix iris hugo clara oscar alma leo ivy omar priya raj aisha kwame mei hiroshi
sofia mateo diego lucia fatima yusuf ingrid sven nadia ivan amara kofi tariq leila mohammed anan
"""
LAST_NAMES = """
smith johnson williams brown jones garcia miller davis rodriguez martinez hernandez lopez gonzalez
wilson anderson thomas taylor moore jackson martin lee perez thompson white harris sanchez clark
ramirez lewis robinson walker young allen king wright scott torres nguyen hill flores green adams
nelson baker hall rivera campbell mitchell carter roberts gomez phillips evans turner diaz parker
cruz edwards collins reyes stewart morris morales murphy cook rogers gutierrez ortiz morgan cooper
peterson bailey reed kelly howard ramos kim cox ward richardson watson brooks chavez wood james
bennett gray mendoza ruiz hughes price alvarez castillo sanders patel myers long ross foster jimenez
powell jenkins perry russell sullivan bell coleman butler henderson barnes gonzales fisher vasquez
simmons romero jordan patterson alexander hamilton graham reynolds griffin wallace moreno west cole
hayes bryant herrera gibson ellis tran medina aguilar stevens murray ford castro marshall owens
harrison fernandez mcdonald woods washington kennedy wells vargas henry chen freeman webb tucker
guzman burns crawford olson simpson porter hunter gordon mendez silva shaw snyder mason dixon munoz
hunt hicks holmes palmer wagner black robertson boyd rose stone salazar fox warren mills meyer rice
schmidt garza daniels ferguson nichols stephens soto weaver ryan gardner payne grant dunn kelley
spencer hawkins arnold pierce hansen peters santos hart bradley knight elliott cunningham duncan
armstrong hudson carroll lane riley andrews ray berry perkins hoffman johnston matthews pena
"""
STREETS = """
maple oak pine cedar elm birch willow chestnut walnut spruce magnolia cherry poplar sycamore hickory
main church market mill park lake river spring hill valley meadow forest garden orchard harbor bridge
washington lincoln jefferson madison franklin adams jackson monroe grant kennedy highland sunset
sunrise ridge prospect union liberty victoria king queen princess station railroad canal beacon
chapel college school center broad water front north south east west first second third fourth fifth
sixth seventh eighth ninth tenth fairview pleasant grove woodland laurel hawthorne heather juniper
"""
STREET_TYPES = "street avenue road lane drive boulevard court place way terrace circle parkway".split()
CITIES = """
boston chicago denver seattle portland austin dallas houston phoenix atlanta miami orlando tampa
nashville memphis detroit cleveland columbus cincinnati pittsburgh philadelphia baltimore richmond
charlotte raleigh savannah charleston louisville indianapolis milwaukee minneapolis omaha kansas city
saint louis tulsa albuquerque tucson las vegas salt lake city boise spokane sacramento san diego
san francisco oakland fresno honolulu anchorage buffalo albany hartford providence newark trenton
london manchester liverpool leeds bristol glasgow edinburgh cardiff belfast dublin cork oxford
cambridge brighton york aberdeen toronto vancouver montreal ottawa calgary sydney melbourne brisbane
perth auckland wellington paris berlin madrid rome lisbon vienna prague amsterdam brussels oslo
stockholm helsinki copenhagen warsaw athens cairo nairobi lagos accra mumbai delhi tokyo osaka seoul
singapore bangkok manila jakarta kingston nassau havana lima bogota santiago quito
"""
# multi-word cities, whose parts are removed from the single-word list below
_MULTI_CITIES = ["kansas city", "saint louis", "las vegas", "salt lake city", "san diego",
                 "san francisco", "new york", "new orleans", "los angeles", "san antonio",
                 "hong kong", "mexico city", "buenos aires", "cape town", "rio de janeiro"]
GROCERIES = """
milk eggs bread butter cheese yogurt apples bananas oranges grapes lemons limes strawberries
blueberries tomatoes potatoes onions garlic carrots broccoli spinach lettuce cucumbers peppers
mushrooms rice pasta flour sugar salt pepper coffee tea cereal oatmeal honey jam peanut butter
chicken beef pork salmon tuna shrimp bacon sausages ham turkey tofu beans lentils chickpeas olive oil
vinegar ketchup mustard mayonnaise soup crackers cookies chips popcorn chocolate ice cream juice
soda water sparkling water paper towels toilet paper dish soap laundry detergent shampoo toothpaste
batteries light bulbs trash bags aluminum foil napkins sponges avocados pears peaches plums melons
pineapple cabbage celery corn peas zucchini pumpkin bagels muffins tortillas noodles walnuts almonds
"""
_MULTI_GROCERIES = ["peanut butter", "olive oil", "ice cream", "sparkling water", "paper towels",
                    "toilet paper", "dish soap", "laundry detergent", "light bulbs", "trash bags",
                    "aluminum foil", "orange juice", "apple juice", "brown sugar", "whole wheat bread",
                    "cream cheese", "sour cream", "green beans", "sweet potatoes", "hot sauce"]
THINGS = """
keys wallet phone glasses umbrella jacket laptop charger backpack notebook passport ticket book
headphones watch ring scarf gloves hat shoes boots bag bottle camera remote tablet pen pencil lamp
blanket pillow mug plate bowl spoon knife fork towel mirror clock radio speaker guitar bicycle
helmet ladder hammer screwdriver toolbox suitcase map letter package envelope receipt calendar
"""
ROOMS = ["kitchen", "living room", "bedroom", "bathroom", "office", "garage", "basement", "hallway",
         "dining room", "nursery", "attic", "porch", "patio", "guest room", "laundry room", "den",
         "study", "playroom", "front yard", "back yard"]
DEVICES = ["lights", "lamp", "fan", "heater", "air conditioner", "tv", "television", "speaker",
           "thermostat", "coffee maker", "dishwasher", "washing machine", "dryer", "oven", "radio",
           "sprinklers", "porch light", "ceiling fan", "humidifier", "vacuum", "garage door",
           "blinds", "curtains", "alarm"]
APPS = ["calendar", "camera", "music", "messages", "email", "maps", "weather", "calculator", "notes",
        "clock", "settings", "photos", "contacts", "podcasts", "news", "browser"]
GENRES = ["jazz", "classical music", "rock", "country music", "hip hop", "blues", "reggae",
          "folk music", "pop music", "soul music", "piano music", "something relaxing",
          "something upbeat", "the news", "the radio", "a podcast", "an audiobook", "rain sounds",
          "white noise", "ocean sounds", "the top hits", "some old songs", "my workout playlist",
          "my favorites", "dinner music", "bluegrass", "opera", "the blues station"]
RELATIVES = ["mom", "dad", "mother", "father", "sister", "brother", "aunt", "uncle", "cousin",
             "grandmother", "grandfather", "grandma", "grandpa", "wife", "husband", "son", "daughter",
             "niece", "nephew", "neighbor", "boss", "friend", "roommate", "teacher", "doctor",
             "dentist", "partner", "coworker", "landlord", "babysitter"]
PLACES = ["the store", "the park", "the library", "the office", "the gym", "the airport",
          "the station", "the beach", "the bank", "the pharmacy", "the post office", "the hospital",
          "the school", "the museum", "the market", "the mall", "the bakery", "the garden",
          "the restaurant", "the cafe", "the theater", "the stadium", "the hotel", "the zoo",
          "the dentist", "the barber", "the farm", "the lake", "the mountains", "the city",
          "the hardware store", "the grocery store", "the bus stop", "the gas station", "work",
          "church", "school", "home", "town", "the cinema", "the swimming pool", "the courthouse"]
ANIMALS = ["dog", "cat", "puppy", "kitten", "horse", "cow", "goat", "sheep", "rabbit", "hamster",
           "parrot", "duck", "goose", "chicken", "rooster", "squirrel", "fox", "deer", "owl", "bear",
           "turtle", "frog", "mouse", "pony", "pig", "donkey", "lamb", "crow", "robin", "raccoon"]
FURNITURE = ["table", "couch", "sofa", "bed", "desk", "chair", "bench", "shelf", "counter", "stairs",
             "porch", "car", "tree", "bridge", "window", "door", "fence", "piano", "bookcase", "rug"]
COLORS = ["red", "blue", "green", "yellow", "orange", "purple", "pink", "black", "white", "gray",
          "brown", "silver", "gold", "navy", "teal", "bright", "dark", "pale", "striped", "old"]
ADJECTIVES = ["quiet", "noisy", "cold", "warm", "hot", "sunny", "cloudy", "windy", "rainy", "busy",
              "early", "late", "small", "large", "heavy", "light", "new", "old", "clean", "dirty",
              "empty", "full", "strange", "lovely", "terrible", "wonderful", "difficult", "easy",
              "expensive", "cheap", "beautiful", "crowded", "comfortable", "boring", "exciting",
              "friendly", "careful", "tired", "hungry", "happy", "nervous", "ready", "lucky", "calm"]
ACTIVITIES = ["go for a walk", "go swimming", "go shopping", "clean the house", "wash the car",
              "mow the lawn", "cook dinner", "bake a cake", "read a book", "watch a movie",
              "call the bank", "pay the bills", "water the plants", "feed the cat", "walk the dog",
              "fix the sink", "paint the fence", "visit the museum", "take a nap", "do the laundry",
              "finish the report", "practice the piano", "play tennis", "ride our bikes",
              "plant some flowers", "write a letter", "pack the suitcase", "catch the train",
              "meet for lunch", "go to bed early", "study for the exam", "take out the trash",
              "change the sheets", "wrap the presents", "book the tickets", "call a taxi",
              "pick up the kids", "return the library books", "order a pizza", "make some tea"]
FOODS = ["pizza", "pasta", "soup", "salad", "sandwiches", "tacos", "curry", "sushi", "noodles",
         "pancakes", "waffles", "burgers", "fried rice", "roast chicken", "fish and chips", "stew",
         "chili", "lasagna", "dumplings", "omelette", "apple pie", "cheesecake", "pot roast",
         "grilled cheese", "mashed potatoes", "scrambled eggs", "steak", "burritos", "risotto",
         "meatballs", "shepherd's pie", "banana bread"]
PROFESSIONS = ["nurse", "teacher", "plumber", "electrician", "lawyer", "pilot", "chef", "farmer",
               "baker", "carpenter", "mechanic", "engineer", "librarian", "firefighter", "pharmacist",
               "accountant", "architect", "journalist", "photographer", "gardener", "dentist",
               "painter", "musician", "waiter", "cashier", "driver", "scientist", "tailor", "vet"]
SPORTS = ["soccer", "football", "baseball", "basketball", "tennis", "golf", "hockey", "cricket",
          "rugby", "volleyball", "swimming", "cycling", "running", "boxing", "skiing", "bowling"]
TEAMS_ADJ = ["red", "blue", "golden", "silver", "northern", "southern", "eastern", "western",
             "mighty", "flying", "royal", "wild", "rapid", "iron", "lone", "thunder"]
TEAMS_NOUN = ["lions", "tigers", "bears", "eagles", "hawks", "wolves", "sharks", "falcons", "rangers",
              "pirates", "giants", "kings", "rockets", "comets", "storm", "raiders", "owls", "foxes"]
WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september",
          "october", "november", "december"]
_MONTH_DAYS = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
RELATIVE_DAYS = ["today", "tonight", "tomorrow", "tomorrow morning", "tomorrow night",
                 "this afternoon", "this evening", "this weekend", "next week", "on the weekend",
                 "yesterday", "last night", "next month", "later today", "this morning"]
CURRENCIES = [("dollar", "dollars", "cent", "cents"), ("pound", "pounds", "penny", "pence"),
              ("euro", "euros", "cent", "cents")]
UNITS = [("degree", "degrees"), ("mile", "miles"), ("kilometer", "kilometers"), ("minute", "minutes"),
         ("hour", "hours"), ("pound", "pounds"), ("kilo", "kilos"), ("meter", "meters"),
         ("foot", "feet"), ("inch", "inches"), ("liter", "liters"), ("cup", "cups"), ("day", "days"),
         ("week", "weeks"), ("year", "years"), ("page", "pages"), ("percent", "percent"),
         ("gallon", "gallons"), ("ounce", "ounces"), ("second", "seconds")]
COUNTABLE = ["apples", "boxes", "chairs", "tickets", "people", "children", "books", "cars", "eggs",
             "bottles", "emails", "messages", "rooms", "steps", "students", "cookies", "plates",
             "houses", "trees", "birds", "bags", "shirts", "photos", "songs", "letters", "coins"]
VERBS_PAST = ["found", "lost", "bought", "sold", "painted", "fixed", "borrowed", "broke", "cleaned",
              "opened", "wrapped", "delivered", "forgot", "hid", "moved", "dropped", "washed",
              "returned", "carried", "packed", "ordered", "noticed", "brought", "left"]
TOPICS = ["the weather", "the game", "the election", "the traffic", "the new bridge", "the budget",
          "the school play", "the concert", "the storm", "the market", "the holiday", "the wedding",
          "the garden show", "the museum opening", "the train strike", "the book club", "the festival"]


_WHEN = RELATIVE_DAYS + [f"on {d}" for d in WEEKDAYS] + [f"next {d}" for d in WEEKDAYS]


def _words(block: str) -> list[str]:
    return sorted(set(block.split()))


_FIRST = _words(FIRST_NAMES)
_LAST = _words(LAST_NAMES)
_STREETS = _words(STREETS)
_CITY_SINGLE = [w for w in _words(CITIES) if w not in {"kansas", "city", "saint", "louis", "las",
                                                        "vegas", "salt", "lake", "san", "diego",
                                                        "francisco"}]
_CITIES = _CITY_SINGLE + _MULTI_CITIES
_GROCERY_PARTS = {"peanut", "olive", "oil", "ice", "cream", "sparkling", "paper", "towels", "toilet",
                  "dish", "soap", "laundry", "detergent", "light", "bulbs", "trash", "bags",
                  "aluminum", "foil"}
_GROCERIES = [w for w in _words(GROCERIES) if w not in _GROCERY_PARTS] + _MULTI_GROCERIES
_THINGS = _words(THINGS)


# --------------------------------------------------------------------------------------------------
# slot generators
# --------------------------------------------------------------------------------------------------

Rng = random.Random


def _small_number(r: Rng) -> str:
    x = r.random()
    if x < 0.5:
        return number_to_words(r.randint(2, 20))
    if x < 0.85:
        return number_to_words(r.randint(21, 99))
    return number_to_words(r.randint(100, 999))


def _big_number(r: Rng) -> str:
    x = r.random()
    if x < 0.4:
        return number_to_words(r.randint(100, 999))
    if x < 0.8:
        return number_to_words(r.randint(1000, 99999))
    return number_to_words(r.randint(100000, 9999999))


def _date(r: Rng) -> str:
    m = r.randrange(12)
    d = r.randint(1, _MONTH_DAYS[m])
    style = r.random()
    if style < 0.55:
        return f"{MONTHS[m]} {ordinal_words(d)}"
    if style < 0.8:
        return f"the {ordinal_words(d)} of {MONTHS[m]}"
    return f"{MONTHS[m]} {ordinal_words(d)} {year_words(r.randint(1950, 2035))}"


def _time(r: Rng) -> str:
    h = r.randint(1, 12)
    style = r.random()
    ampm = r.choice(["a m", "p m", "in the morning", "in the evening", "at night", "", "", ""])
    if style < 0.35:
        m = r.choice([5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 7, 12, 18, 23, 48])
        mm = ("oh " + _ONES[m]) if m < 10 else number_to_words(m)
        t = f"{number_to_words(h)} {mm}"
    elif style < 0.6:
        t = f"{number_to_words(h)} o'clock" if r.random() < 0.6 else number_to_words(h)
    elif style < 0.8:
        t = r.choice(["half past", "quarter past", "quarter to", "ten past", "twenty to", "five past"]) \
            + " " + number_to_words(h)
    else:
        return r.choice(["noon", "midnight", "noon sharp", "midday"])
    return (t + " " + ampm).strip()


def _money(r: Rng) -> str:
    one, many, c_one, c_many = r.choice(CURRENCIES) if r.random() < 0.5 else CURRENCIES[0]
    major = r.choice([r.randint(1, 20), r.randint(1, 99), r.randint(100, 999), r.randint(1000, 25000)])
    minor = r.choice([0, 0, r.randint(1, 99), 50, 25, 99])
    unit = one if major == 1 else many
    s = f"{number_to_words(major)} {unit}"
    if minor:
        s += f" and {number_to_words(minor)} {c_one if minor == 1 else c_many}"
    return s


def _quantity(r: Rng) -> str:
    one, many = r.choice(UNITS)
    n = r.choice([1, r.randint(2, 12), r.randint(13, 100), r.randint(100, 500)])
    if r.random() < 0.15:
        return f"{number_to_words(n)} point {_ONES[r.randint(1, 9)]} {many}"
    return f"{number_to_words(n)} {one if n == 1 else many}"


def _address(r: Rng) -> str:
    n = r.randint(1, 9999)
    x = r.random()
    if n >= 100 and x < 0.5 and n % 100 != 0:
        hi, lo = divmod(n, 100)
        num = number_to_words(hi) + " " + (("oh " + _ONES[lo]) if lo < 10 else number_to_words(lo))
    else:
        num = number_to_words(n)
    return f"{num} {r.choice(_STREETS)} {r.choice(STREET_TYPES)}"


def _phone(r: Rng) -> str:
    digits = "".join(str(r.randint(0, 9)) for _ in range(r.choice([7, 10])))
    words = ["oh" if c == "0" and r.random() < 0.5 else ("zero" if c == "0" else _ONES[int(c)])
             for c in digits]
    return " ".join(words)


def _count_things(r: Rng) -> str:
    return f"{number_to_words(r.randint(2, 60))} {r.choice(COUNTABLE)}"


def _year(r: Rng) -> str:
    return year_words(r.randint(1900, 2030))


def _duration(r: Rng) -> str:
    x = r.random()
    if x < 0.4:
        n = r.choice([1, 2, 3, 5, 10, 15, 20, 25, 30, 40, 45, 90])
        return "one minute" if n == 1 else f"{number_to_words(n)} minutes"
    if x < 0.7:
        n = r.randint(1, 12)
        return "an hour" if n == 1 else f"{number_to_words(n)} hours"
    if x < 0.85:
        return f"{number_to_words(r.randint(10, 59))} seconds"
    return r.choice(["half an hour", "an hour and a half", "a quarter of an hour", "two and a half hours"])


def _percent(r: Rng) -> str:
    return f"{number_to_words(r.randint(1, 100))} percent"


def _temperature(r: Rng) -> str:
    t = r.randint(-10, 105)
    return ("minus " + number_to_words(-t) if t < 0 else number_to_words(t)) + " degrees"


def _team(r: Rng) -> str:
    return f"the {r.choice(_CITY_SINGLE)} {r.choice(TEAMS_NOUN)}" if r.random() < 0.5 else \
        f"the {r.choice(TEAMS_ADJ)} {r.choice(TEAMS_NOUN)}"


def _score(r: Rng) -> str:
    a, b = r.randint(0, 9), r.randint(0, 9)
    return f"{number_to_words(a)} to {number_to_words(b)}"


def _flight(r: Rng) -> str:
    return f"flight {number_to_words(r.randint(10, 999))}" if r.random() < 0.6 else \
        f"flight {digits_words(str(r.randint(1000, 9999)))}"


def _fullname(r: Rng) -> str:
    return f"{r.choice(_FIRST)} {r.choice(_LAST)}"


def _ordinal_floor(r: Rng) -> str:
    return ordinal_words(r.randint(1, 40))


SLOTS: dict[str, Callable[[Rng], str]] = {
    "first": lambda r: r.choice(_FIRST),
    "last": lambda r: r.choice(_LAST),
    "name": _fullname,
    "city": lambda r: r.choice(_CITIES),
    "grocery": lambda r: r.choice(_GROCERIES),
    "thing": lambda r: r.choice(_THINGS),
    "room": lambda r: r.choice(ROOMS),
    "device": lambda r: r.choice(DEVICES),
    "app": lambda r: r.choice(APPS),
    "genre": lambda r: r.choice(GENRES),
    "relative": lambda r: r.choice(RELATIVES),
    "place": lambda r: r.choice(PLACES),
    "animal": lambda r: r.choice(ANIMALS),
    "furniture": lambda r: r.choice(FURNITURE),
    "color": lambda r: r.choice(COLORS),
    "adj": lambda r: r.choice(ADJECTIVES),
    "activity": lambda r: r.choice(ACTIVITIES),
    "food": lambda r: r.choice(FOODS),
    "job": lambda r: r.choice(PROFESSIONS),
    "sport": lambda r: r.choice(SPORTS),
    "weekday": lambda r: r.choice(WEEKDAYS),
    "month": lambda r: r.choice(MONTHS),
    "when": lambda r: r.choice(_WHEN),
    "verbed": lambda r: r.choice(VERBS_PAST),
    "topic": lambda r: r.choice(TOPICS),
    "num": _small_number,
    "bignum": _big_number,
    "date": _date,
    "time": _time,
    "money": _money,
    "qty": _quantity,
    "address": _address,
    "phone": _phone,
    "count": _count_things,
    "year": _year,
    "duration": _duration,
    "percent": _percent,
    "temp": _temperature,
    "team": _team,
    "score": _score,
    "flight": _flight,
    "ordinal": _ordinal_floor,
    "street": lambda r: f"{r.choice(_STREETS)} {r.choice(STREET_TYPES)}",
}

# --------------------------------------------------------------------------------------------------
# templates: (category, template). {slot} is filled independently at each occurrence.
# --------------------------------------------------------------------------------------------------

TEMPLATES: list[tuple[str, str]] = [
    # voice-assistant commands
    ("command", "set an alarm for {time}"),
    ("command", "wake me up at {time} {when}"),
    ("command", "set a timer for {duration}"),
    ("command", "remind me to {activity} {when}"),
    ("command", "remind me to call {first} at {time}"),
    ("command", "turn on the {device} in the {room}"),
    ("command", "turn off the {room} {device}"),
    ("command", "dim the {room} lights to {percent}"),
    ("command", "set the thermostat to {temp}"),
    ("command", "play {genre} in the {room}"),
    ("command", "play some {genre}"),
    ("command", "play the latest album by {name}"),
    ("command", "add {grocery} to my shopping list"),
    ("command", "add {grocery} and {grocery} to the shopping list"),
    ("command", "put {grocery} on the list for {weekday}"),
    ("command", "what's the weather like in {city} {when}"),
    ("command", "will it rain in {city} {when}"),
    ("command", "how long will it take to drive to {city}"),
    ("command", "give me directions to {address}"),
    ("command", "navigate to {address} in {city}"),
    ("command", "call {first} {last}"),
    ("command", "call my {relative} on speaker"),
    ("command", "send a message to {first} saying i'll be there at {time}"),
    ("command", "text my {relative} that i'm running {duration} late"),
    ("command", "dial {phone}"),
    ("command", "open the {app} app"),
    ("command", "show me my photos from {date}"),
    ("command", "what's on my calendar for {date}"),
    ("command", "schedule a meeting with {name} on {date} at {time}"),
    ("command", "cancel my appointment with the {job} {when}"),
    ("command", "move my {time} meeting to {weekday}"),
    ("command", "book a table for {num} at {time}"),
    ("command", "order {count} from the {place_word}"),
    ("command", "how much is {bignum} divided by {num}"),
    ("command", "what is {num} times {num}"),
    ("command", "convert {qty} to {unit_word}"),
    ("command", "what time is it in {city}"),
    ("command", "when does {flight} land in {city}"),
    ("command", "check the status of {flight} to {city}"),
    ("command", "what was the score of the {team} game"),
    ("command", "read me the news about {topic}"),
    ("command", "lock the {door_word} door"),
    ("command", "start the {device} at {time}"),
    ("command", "pause the music"),
    ("command", "turn the volume up to {small_digit}"),
    ("command", "skip to the next song"),
    ("command", "find a {food} restaurant near {address}"),
    ("command", "how far is {city} from {city}"),
    ("command", "spell the word {adj}"),
    ("command", "pay {name} {money}"),
    ("command", "transfer {money} to my savings account"),
    ("command", "what's my balance {when}"),
    # numbers, dates, times, money
    ("numbers", "the total comes to {money}"),
    ("numbers", "i paid {money} for the {thing}"),
    ("numbers", "the {thing} costs {money} at {place}"),
    ("numbers", "we sold {count} for {money}"),
    ("numbers", "my flight leaves at {time} on {date}"),
    ("numbers", "the meeting was moved to {date} at {time}"),
    ("numbers", "she was born on {date}"),
    ("numbers", "the museum opened in {year}"),
    ("numbers", "they moved to {city} in {year}"),
    ("numbers", "the store closes at {time} on {weekday}"),
    ("numbers", "the train to {city} departs at {time}"),
    ("numbers", "it's about {qty} from here"),
    ("numbers", "the recipe needs {cook_qty} of {grocery}"),
    ("numbers", "the population is roughly {bignum}"),
    ("numbers", "there were {bignum} people at the {sport} match"),
    ("numbers", "prices went up by {percent} last year"),
    ("numbers", "it was {temp} in {city} {when}"),
    ("numbers", "my new number is {phone}"),
    ("numbers", "please call me back at {phone}"),
    ("numbers", "the final score was {score}"),
    ("numbers", "the rent is {money} a month"),
    ("numbers", "we need {count} by {date}"),
    ("numbers", "the package should arrive on {date}"),
    ("numbers", "take the elevator to the {ordinal} floor"),
    ("numbers", "{team} won {score} on {weekday}"),
    ("numbers", "the invoice for {money} is due on {date}"),
    ("numbers", "chapter {num} starts on page {bignum}"),
    ("numbers", "the bus comes every {duration}"),
    ("numbers", "i ran {qty} {when}"),
    # addresses and names
    ("address", "i live at {address}"),
    ("address", "the office is at {address} in {city}"),
    ("address", "send the package to {name} at {address}"),
    ("address", "our new house is on {street} near {place}"),
    ("address", "turn left onto {street} and keep going"),
    ("address", "the party is at {first}'s place on {street}"),
    ("address", "meet me at the corner of {street} and {street}"),
    ("names", "my name is {name}"),
    ("names", "this is {first} calling from {city}"),
    ("names", "{name} is our new {job}"),
    ("names", "have you met {first} and {first}"),
    ("names", "{first} {last} will join us {when}"),
    ("names", "please ask for {first} at the front desk"),
    ("names", "{first}'s {relative} works as a {job} in {city}"),
    ("names", "doctor {last} will see you at {time}"),
    ("names", "mister {last} left a message for you"),
    ("names", "missus {last} asked about the {thing}"),
    ("names", "i think {first} borrowed my {thing}"),
    ("names", "tell {first} that dinner is ready"),
    # everyday sentences
    ("everyday", "my {relative} is going to {place} {when}"),
    ("everyday", "{first} forgot the {thing} at {place}"),
    ("everyday", "the {animal} is sleeping under the {furniture}"),
    ("everyday", "we should {activity} before it gets dark"),
    ("everyday", "i need to {activity} {when}"),
    ("everyday", "do you want to {activity} {when}"),
    ("everyday", "it was a {adj} day at {place}"),
    ("everyday", "the {room} is too {adj} to work in"),
    ("everyday", "can you help me find my {thing}"),
    ("everyday", "i left my {thing} in the {room}"),
    ("everyday", "have you seen the {color} {thing}"),
    ("everyday", "{first} {verbed} the {color} {thing} {when}"),
    ("everyday", "we're having {food} for dinner {when}"),
    ("everyday", "i'd like the {food} and a glass of water please"),
    ("everyday", "the {food} at that place was {adj}"),
    ("everyday", "my {relative} makes the best {food}"),
    ("everyday", "the {animal} ran across the road and into the {place_word}"),
    ("everyday", "there's a {adj} {animal} in the {room}"),
    ("everyday", "the roads were {adj} this morning"),
    ("everyday", "i can't believe how {adj} it is outside"),
    ("everyday", "she plays {sport} every {weekday}"),
    ("everyday", "he wants to be a {job} when he grows up"),
    ("everyday", "we watched the {sport} game at {first}'s house"),
    ("everyday", "let's {activity} and then {activity}"),
    ("everyday", "don't forget to {activity}"),
    ("everyday", "the {job} said it would take {duration}"),
    ("everyday", "i'm not sure where i put the {thing}"),
    ("everyday", "the {thing} is on the {furniture} in the {room}"),
    ("everyday", "could you pass me the {grocery}"),
    ("everyday", "we ran out of {grocery} again"),
    ("everyday", "everyone was talking about {topic}"),
    ("everyday", "the kids are excited about {topic}"),
    ("everyday", "my {relative} just moved to {city}"),
    ("everyday", "the view from the bridge in {city} is {adj}"),
    ("everyday", "i'll meet you at {place} after work"),
    ("everyday", "it takes {duration} to get to {place}"),
    ("everyday", "the {color} car parked outside belongs to {first}"),
    ("everyday", "thank you for the {adj} {thing}"),
    ("everyday", "sorry i'm late the traffic was {adj}"),
    ("everyday", "is the {place_word} open {when}"),
    ("everyday", "how was your trip to {city}"),
    ("everyday", "what did the {job} say about the {thing}"),
    ("everyday", "my {animal} loves chasing the {color} ball"),
    ("everyday", "the {adj} {job} fixed it in {duration}"),
    ("everyday", "why is the {device} still on"),
    ("everyday", "who left the {device} running in the {room}"),
    ("everyday", "please wipe your feet before you come in"),
    ("everyday", "we need a bigger {furniture} for the {room}"),
]

def _cook_quantity(r: Rng) -> str:
    k = r.randrange(8)
    if k == 0:
        return r.choice(["one cup", "half a cup", "a pinch", "one teaspoon", "one tablespoon", "a pound"])
    if k == 1:
        return f"{r.choice(_ONES[2:9])} cups"
    if k == 2:
        return f"{r.choice(_ONES[2:6])} tablespoons"
    if k == 3:
        return f"{r.choice(_ONES[2:6])} teaspoons"
    if k in (4, 5):
        return f"{number_to_words(r.choice([50, 100, 150, 200, 250, 300, 400, 500]))} grams"
    if k == 6:
        return f"{r.choice(_ONES[2:13])} ounces"
    return f"{r.choice(_ONES[2:5])} pounds"


_EXTRA_SLOTS: dict[str, Callable[[Rng], str]] = {
    "place_word": lambda r: r.choice(["bakery", "market", "park", "garden", "pharmacy", "pizza place",
                                      "diner", "corner shop", "cafe", "library", "deli", "gym"]),
    "unit_word": lambda r: r.choice(["kilometers", "miles", "pounds", "kilos", "cups", "liters",
                                     "feet", "meters", "ounces", "gallons", "fahrenheit", "celsius"]),
    "door_word": lambda r: r.choice(["front", "back", "garage", "side", "kitchen", "patio", "cellar"]),
    "small_digit": lambda r: r.choice(_ONES[1:11]),
    "cook_qty": lambda r: _cook_quantity(r),
}
SLOTS.update(_EXTRA_SLOTS)

_SLOT_RE = re.compile(r"\{(\w+)\}")
MIN_WORDS, MAX_WORDS = 3, 20


def _fill(template: str, r: Rng) -> str:
    return _SLOT_RE.sub(lambda m: SLOTS[m.group(1)](r), template)


def generate_sentence(r: Rng) -> str:
    """One normalized sentence from the random source ``r``."""
    while True:
        _cat, tpl = r.choice(TEMPLATES)
        s = normalize_text(_fill(tpl, r))
        n = len(s.split())
        if MIN_WORDS <= n <= MAX_WORDS:
            return s


def generate_sentences(n: int, seed: int = 1234, exclude: Iterable[str] = ()) -> list[str]:
    """``n`` unique sentences, deterministic from ``seed``; sentences in ``exclude`` are skipped."""
    r = random.Random(f"harken-textgen-{seed}")
    seen = set(exclude)
    out: list[str] = []
    attempts = 0
    limit = 50 * n + 1000
    while len(out) < n:
        attempts += 1
        if attempts > limit:
            raise RuntimeError(f"could only generate {len(out)} unique sentences of {n} requested")
        s = generate_sentence(r)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def make_splits(counts: Mapping[str, int], seed: int = 1234) -> dict[str, list[str]]:
    """Disjoint lists of sentences per split (no exact sentence is in two splits).

    The pool is generated in one pass and shuffled, so a split's content depends only on the seed
    and the counts, and adding utterances to one split does not make another split reuse text.
    """
    total = sum(int(v) for v in counts.values())
    pool = generate_sentences(total, seed)
    random.Random(f"harken-split-{seed}").shuffle(pool)
    out: dict[str, list[str]] = {}
    i = 0
    for name, k in counts.items():
        out[name] = pool[i:i + int(k)]
        i += int(k)
    return out


def vocab_stats(splits: Mapping[str, Iterable[str]], train: str = "train") -> dict:
    """Vocabulary size of ``train`` and, for every other split, the OOV rate: the fraction of its
    word tokens that never occur in ``train``."""
    vocab: set[str] = set()
    for s in splits.get(train, []):
        vocab.update(s.split())
    stats: dict = {"vocab_size": len(vocab), "oov_rate": {}, "oov_types": {}}
    for name, sents in splits.items():
        if name == train:
            continue
        tokens = [w for s in sents for w in s.split()]
        oov = [w for w in tokens if w not in vocab]
        stats["oov_rate"][name] = round(len(oov) / len(tokens), 4) if tokens else 0.0
        stats["oov_types"][name] = len(set(oov))
    return stats


def all_words() -> set[str]:
    """Every word that can appear in a generated sentence (approximate: from lists and templates)."""
    words: set[str] = set(_ONES) | set(_TENS[2:]) | {"hundred", "thousand", "million", "billion"}
    lists: list[Iterable[str]] = [_FIRST, _LAST, _STREETS, _CITIES, _GROCERIES, _THINGS, ROOMS, DEVICES,
                                  APPS, GENRES, RELATIVES, PLACES, ANIMALS, FURNITURE, COLORS, ADJECTIVES,
                                  ACTIVITIES, FOODS, PROFESSIONS, SPORTS, WEEKDAYS, MONTHS, RELATIVE_DAYS,
                                  VERBS_PAST, TOPICS, COUNTABLE, STREET_TYPES, TEAMS_ADJ, TEAMS_NOUN]
    for lst in lists:
        for item in lst:
            words.update(normalize_text(item).split())
    for _c, t in TEMPLATES:
        words.update(normalize_text(_SLOT_RE.sub(" ", t)).split())
    return words
