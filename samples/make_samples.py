"""Regenerate the sample datasets in this folder, deterministically.

    python samples/make_samples.py

writes tickets.csv, reviews.csv and articles.parquet next to this script. All data is invented;
the generator is seeded, so the same script always writes the same files (byte for byte for the
CSVs). The outputs are committed too, so nobody needs to run this to try batchrun.
"""
from __future__ import annotations

import csv
import datetime as dt
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
SEED = 20261123

N_TICKETS = 300
N_REVIEWS = 400
N_ARTICLES = 200


def fill(text: str, slots: dict) -> str:
    return text.format(**slots)


def dates_between(rng: random.Random, start: dt.date, end: dt.date, n: int) -> list:
    span = (end - start).days
    return sorted(start + dt.timedelta(days=rng.randint(0, span)) for _ in range(n))


# =============================================================================================
# tickets.csv
# =============================================================================================

CUSTOMERS = [
    "Zoë Martin", "José Álvarez", "李雷", "韩梅梅", "Ołeksandr Kovalenko", "Małgorzata Nowak",
    "Björn Lindqvist", "Nguyễn Văn An", "Aïcha Benali", "François Dubois", "Şebnem Yılmaz",
    "Priya Raghunathan", "Αλέξανδρος Παπαδόπουλος", "Дмитрий Иванов", "田中 裕子", "김민준",
    "Seán Ó Briain", "Siobhan O'Connor", "Smith, John", "Renée Fontaine", "Jürgen Weiß",
    "Ana Lúcia Ferreira", "Chloé Girard", "Mateus Gonçalves", "Ingrid Sæther", "Kwame Mensah",
    "Fatima Zahra El Idrissi", "Emily Carter", "Michael Brown", "Sarah Thompson", "David Kim",
    "Laura Rossi", "Tomás Ruiz", "Hannah Müller", "Olivia Chen", "Daniel Okafor", "Grace Liu",
    "Ravi Shankar", "Noah Williams", "Mia Jensen", "Lucas Petit", "Ava Johnson", "Ethan Park",
    "Isabella García", "Liam O'Brien", "Sophie Laurent", "Yusuf Demir", "Amara Nwosu",
    "Chen Wei", "Eva Novák", "Pieter van der Berg", "Karolina Wiśniewska", "Rafael Souza",
    "Nadia Haddad", "Tariq Aziz", "Maya Patel", "Jonas Schmidt", "Elena Popescu", "Bjørn Dahl",
]

PLANS = ["Starter", "Pro", "Team", "Business"]
BROWSERS = ["Chrome 131", "Firefox 133", "Safari 18.1", "Edge 131"]
DEVICES = ["iPhone 15", "Pixel 8", "Galaxy S23", "iPad Air", "a Windows 11 laptop", "a MacBook Air"]
APP_VERSIONS = ["4.11.0", "4.11.2", "4.12.0", "4.12.1", "4.13.0-beta"]
CARRIERS = ["DHL", "UPS", "FedEx", "Royal Mail", "La Poste", "PostNL"]
PRODUCTS = ["the standing desk frame", "the 27-inch monitor arm", "the ergonomic chair", "a pack of cable trays",
            "the desk lamp", "the laptop stand", "the under-desk drawer", "the footrest"]
FEATURES = ["dark mode", "CSV export of invoices", "two-factor authentication with hardware keys",
            "a shared team calendar", "bulk editing of orders", "an API for order status",
            "Slack notifications", "scheduled reports"]

# Each scenario: (subject, [sentences in a natural order]). A ticket body uses the first k sentences.
TICKET_SCENARIOS = {
    "billing": [
        ("Charged twice this month", [
            "I was charged {amount} twice on {date} for the same {plan} subscription.",
            "Both charges show on my card ending in {last4}, one at 09:14 and one at 09:15.",
            "I only have one account, so this looks like a duplicate payment.",
            "Could you refund the second charge and confirm when it will appear?",
            "I've attached a screenshot of the bank statement.",
        ]),
        ("Invoice shows wrong VAT number", [
            "The invoice for {date} shows an old VAT number for our company.",
            "Our finance team can't book it until the VAT ID reads {vat}.",
            "We updated it in the billing settings last week, but the invoice still says \"VAT ID: not provided\".",
            "Please reissue the invoice, ideally before the end of the month.",
        ]),
        ("Why did my price go up?", [
            "My renewal was {amount} instead of the usual price.",
            "Nobody told me the {plan} plan was getting more expensive.",
            "Is this a mistake, or did I miss an email?",
            "If it's a new price, I'd like to know whether I can stay on the old one until my contract ends.",
        ]),
        ("Payment keeps failing", [
            "Every time I try to pay, the checkout says \"Payment declined, code 51\".",
            "My bank says they never saw the attempt.",
            "I've tried two different cards, and both fail at the same step.",
            "My subscription expires on {date}, so I need this fixed soon.",
            "Do you accept bank transfer as an alternative?",
        ]),
        ("Upgrade charged the full amount", [
            "I upgraded from Starter to {plan} halfway through the month.",
            "I expected a prorated charge, but I paid the full {amount}.",
            "Your pricing page says upgrades are prorated, so something seems off.",
        ]),
    ],
    "account": [
        ("Can't log in after password reset", [
            "I reset my password this morning, but the login page still says \"Incorrect email or password\".",
            "I've tried in {browser} and in a private window.",
            "The reset email arrived and the link worked, it just doesn't accept the new password.",
            "I need access today because our team's schedules are in there.",
        ]),
        ("2FA codes not accepted", [
            "My authenticator app codes are rejected every time.",
            "I changed phones last week and moved the app to my new {device}.",
            "I don't have my backup codes anymore.",
            "How do I get back into my account?",
            "I can prove who I am with the card on file or an invoice number.",
        ]),
        ("Please change the email on my account", [
            "I'm leaving my job and need to move my account from my work email to a personal one.",
            "The settings page greys out the email field.",
            "Can you switch it for me, or tell me how?",
        ]),
        ("Locked out — too many attempts", [
            "The app says my account is locked for 24 hours after too many attempts.",
            "I wasn't the one trying to log in, so I'm worried someone else has my password.",
            "Can you unlock it and tell me where the attempts came from?",
            "I'd also like to sign out every other session.",
        ]),
        ("Delete my account and data", [
            "Please close my account and delete all my personal data.",
            "I'm making this request under GDPR.",
            "Please confirm in writing once it's done, and tell me if anything has to be kept for legal reasons.",
        ]),
        ("Add a colleague to our team", [
            "I'm the admin of our {plan} workspace and the invite button does nothing.",
            "I need to add two new colleagues before Monday.",
            "Is there a seat limit on our plan that I'm hitting?",
        ]),
    ],
    "bug": [
        ("App crashes when I open reports", [
            "The app crashes as soon as I open the Reports tab.",
            "I'm on version {version} on {device}.",
            "It started after the last update, and reinstalling didn't help.",
            "The crash happens every time, not just sometimes.",
            "Other tabs work fine.",
        ]),
        ("Export to CSV produces garbled characters", [
            "When I export orders to CSV, names with accents come out garbled, for example \"JosÃ©\" instead of \"José\".",
            "Excel shows the same problem as Google Sheets.",
            "This breaks our import into the accounting tool.",
            "I think the file isn't UTF-8 encoded.",
        ]),
        ("Dashboard shows yesterday's numbers", [
            "The dashboard hasn't refreshed since yesterday.",
            "The \"last updated\" label says {date} 23:59 even though it's midday now.",
            "Refreshing the page and logging out and in again don't change anything.",
            "My colleagues see the same thing, so it isn't just my browser.",
        ]),
        ("Search returns nothing", [
            "Search returns no results for orders I know exist, like {order}.",
            "Filtering by date still works, so the orders are there.",
            "It's been like this since this morning in {browser}.",
        ]),
        ("Buttons overlap on small screens", [
            "On {device} the Save and Cancel buttons overlap in the edit dialog.",
            "I sometimes hit Cancel when I meant to save and lose my changes.",
            "Rotating the screen to landscape fixes the layout.",
            "Not urgent, but it's annoying.",
        ]),
        ("Error 500 when uploading a file", [
            "Uploading any PDF larger than about 5 MB fails with \"Error 500: something went wrong\".",
            "Smaller files upload fine.",
            "I need to attach signed contracts, and most of them are 6 to 10 MB.",
            "We've tried {browser} and the desktop app, same error.",
            "This is blocking our whole onboarding process.",
        ]),
        ("Data missing after sync", [
            "After the sync last night, about thirty customer records are missing from our workspace.",
            "They still show in last week's export, so they existed.",
            "Nobody on our team deleted them as far as I know.",
            "Please tell me whether they can be restored, because we invoice from these records on Friday.",
        ]),
    ],
    "feature_request": [
        ("Feature request: {feature}", [
            "It would be great to have {feature}.",
            "Right now we work around it with a spreadsheet, which takes an hour a week.",
            "Several people on my team have asked for this.",
            "Is it on the roadmap?",
        ]),
        ("Suggestion for the mobile app", [
            "Could the mobile app remember the last filter I used?",
            "I set the same filter every single time I open it.",
            "A small thing, but it would save a lot of taps.",
        ]),
        ("Would love {feature}", [
            "We're evaluating whether to move our whole department to your tool.",
            "The one thing missing for us is {feature}.",
            "If that's coming in the next few months, we'd sign up for the {plan} plan.",
            "Happy to join a beta if there is one.",
        ]),
    ],
    "shipping": [
        ("Where is my order {order}?", [
            "My order {order} was supposed to arrive on {date}.",
            "The {carrier} tracking number {tracking} hasn't updated in five days.",
            "Can you check with the carrier?",
            "I need {product} for a new starter on Monday.",
        ]),
        ("Package delivered to the wrong address", [
            "Tracking says my parcel was delivered, but it isn't here.",
            "The photo in the {carrier} app shows a door that isn't mine.",
            "The order number is {order}.",
            "Can you send a replacement or open a claim with the carrier?",
        ]),
        ("Item arrived damaged", [
            "{product} arrived with a cracked corner and a bent bracket.",
            "The outer box was crushed, so it probably happened in transit.",
            "I've kept the packaging and taken photos.",
            "I'd prefer a replacement rather than a refund.",
        ]),
        ("Can I change my delivery address?", [
            "I just placed order {order} and realised it's going to my old address.",
            "It hasn't shipped yet according to the order page.",
            "The new address is in the same city, postcode 10115.",
        ]),
        ("Missing parts", [
            "The box for {product} came without the screws and the Allen key.",
            "The instructions list a bag \"B\" that isn't in the package.",
            "Could you send the missing parts?",
            "Order {order}, delivered on {date}.",
        ]),
    ],
    "refund": [
        ("Refund request for order {order}", [
            "I'd like to return {product} from order {order}.",
            "It doesn't fit under my desk, which is my fault for not measuring.",
            "It's unused and still in the original box.",
            "How do I get a return label?",
        ]),
        ("Still waiting for my refund", [
            "You confirmed my refund of {amount} on {date}, but nothing has arrived.",
            "Your email said five to seven working days, and it's been three weeks.",
            "Can you send me a transaction reference so my bank can trace it?",
            "I'm starting to think about a chargeback, which I'd rather avoid.",
        ]),
        ("Cancel and refund annual plan", [
            "I renewed the annual {plan} plan by accident on {date}.",
            "I meant to switch to monthly before the renewal.",
            "I haven't used anything since the renewal.",
            "Can you refund the {amount} and move me to monthly?",
        ]),
        ("Refund for the outage", [
            "Your service was down for most of {date}, during our busiest day.",
            "We lost a day of orders because of it.",
            "I think we're owed a credit under your SLA.",
            "Please tell me how that's calculated.",
        ]),
    ],
    "praise": [
        ("Thank you!", [
            "Just wanted to say thanks to the agent who helped me yesterday.",
            "She sorted out my billing problem in ten minutes, after I'd been stuck for a week.",
            "Great service, keep it up.",
        ]),
        ("Love the new update", [
            "The new version is so much faster, great work.",
            "The reports load instantly now.",
            "Whoever designed the new calendar view deserves a raise.",
        ]),
        ("Fantastic chair", [
            "The ergonomic chair arrived a day early and my back pain is already better.",
            "Assembly took fifteen minutes.",
            "I've recommended you to three colleagues already.",
        ]),
    ],
    "other": [
        ("Question about your company", [
            "Do you have an office in Europe?",
            "We're a school and we'd like to know about education discounts.",
            "Is there someone I can talk to about a partnership?",
        ]),
        ("Newsletter", [
            "Please stop sending me the weekly newsletter.",
            "I've clicked unsubscribe twice.",
        ]),
        ("Job application", [
            "I saw you're hiring support agents.",
            "Is the role open to remote candidates outside the EU?",
        ]),
        ("Security report", [
            "I think I found a security problem: the password reset page reveals whether an email address is registered.",
            "I haven't tested anything beyond that.",
            "Who should I send details to?",
        ]),
    ],
}

TOPIC_WEIGHTS = {"billing": 16, "account": 16, "bug": 20, "feature_request": 9, "shipping": 16,
                 "refund": 11, "praise": 6, "other": 6}

CHAT_OPENERS = ["hi", "hello", "hey there", "hi, quick question", ""]
URGENT_TAILS = {"bug": ["This is urgent.", "Please help ASAP!!", "We are losing money every hour this isn't fixed."],
                "account": ["This is urgent.", "Please help ASAP!!"],
                "shipping": ["This is urgent.", "Please help ASAP!!"]}


def ticket_slots(rng: random.Random) -> dict:
    return {
        "amount": f"{rng.choice(['$', '€', '£'])}{rng.choice([9, 19, 29, 49, 99, 149, 240, 588])}.{rng.choice(['00', '99'])}",
        "date": (dt.date(2026, 8, 1) + dt.timedelta(days=rng.randint(0, 100))).strftime("%-d %B"),
        "plan": rng.choice(PLANS),
        "last4": f"{rng.randint(0, 9999):04d}",
        "vat": f"{rng.choice(['DE', 'FR', 'NL', 'PL', 'IE'])}{rng.randint(100000000, 999999999)}",
        "browser": rng.choice(BROWSERS),
        "device": rng.choice(DEVICES),
        "version": rng.choice(APP_VERSIONS),
        "order": f"#{rng.randint(40000, 99999)}",
        "carrier": rng.choice(CARRIERS),
        "tracking": f"{rng.choice(['JD', '1Z', 'LX', 'CP'])}{rng.randint(10**9, 10**10 - 1)}",
        "product": rng.choice(PRODUCTS),
        "feature": rng.choice(FEATURES),
    }


def capitalise_first(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


def make_tickets(rng: random.Random) -> list:
    rows = []
    ids = []
    n = 10001
    for _ in range(N_TICKETS):
        n += rng.randint(3, 41)
        ids.append(n)
    dates = dates_between(rng, dt.date(2026, 8, 3), dt.date(2026, 11, 20), N_TICKETS)
    topics = list(TOPIC_WEIGHTS)
    weights = [TOPIC_WEIGHTS[t] for t in topics]
    # a few rows with deliberately empty cells
    blank_customer = set(rng.sample(range(N_TICKETS), 6))
    blank_channel = set(rng.sample(range(N_TICKETS), 5))
    for i, (num, created) in enumerate(zip(ids, dates)):
        topic = rng.choices(topics, weights)[0]
        subject_tpl, sentences = rng.choice(TICKET_SCENARIOS[topic])
        slots = ticket_slots(rng)
        subject = fill(subject_tpl, slots)
        k = rng.randint(1, len(sentences))
        picked = [fill(s, slots) for s in sentences[:k]]
        if topic in ("bug", "account", "shipping") and len(picked) < 6 and rng.random() < 0.12:
            picked.append(rng.choice(URGENT_TAILS[topic]))
        channel = rng.choices(["email", "chat", "phone"], [50, 32, 18])[0]
        customer = rng.choice(CUSTOMERS)
        first = customer.split(",")[-1].strip().split(" ")[0]
        if channel == "email":
            body = " ".join(picked)
            if rng.random() < 0.6:
                # a real e-mail: greeting, paragraphs, sign-off — newlines inside the cell
                paras = [" ".join(picked[:2]), " ".join(picked[2:])] if len(picked) > 2 else [body]
                body = "Hello,\n\n" + "\n\n".join(p for p in paras if p) + f"\n\nThanks,\n{first}"
        elif channel == "chat":
            opener = rng.choice(CHAT_OPENERS)
            text = " ".join(picked)
            if rng.random() < 0.35:
                text = text.lower().rstrip(".")
            body = f"{opener} — {text[:1].lower() + text[1:]}" if opener else text
        else:
            # phone tickets are the agent's notes, quoting the caller
            notes = " ".join(picked)
            if '"' in notes:
                body = "Customer called and said: " + notes
            else:
                body = f'Customer called. In their words: "{notes}"'
            if rng.random() < 0.3:
                body += "\nCallback requested."
        rows.append({
            "ticket_id": f"T-{num}",
            "created_at": created.isoformat(),
            "customer": "" if i in blank_customer else customer,
            "channel": "" if i in blank_channel else channel,
            "subject": capitalise_first(subject),
            "body": body,
        })
    return rows


# =============================================================================================
# reviews.csv
# =============================================================================================

REVIEW_PRODUCTS = {
    "Aurora Wireless Earbuds": ["sound", "battery life", "fit", "noise cancelling", "charging case"],
    "Nimbus 2 Robot Vacuum": ["suction", "app", "navigation", "battery", "noise level"],
    "Kettle Pro 1.7L": ["boil time", "lid", "temperature settings", "build quality", "handle"],
    "TrailRunner GTX Shoes": ["grip", "comfort", "sizing", "waterproofing", "durability"],
    "Lumen Desk Lamp": ["brightness", "colour temperature", "base", "touch controls", "price"],
    "Barista Mini Espresso Machine": ["espresso", "milk frother", "water tank", "warm-up time", "cleaning"],
    "Atlas 40L Backpack": ["zips", "straps", "laptop sleeve", "material", "pockets"],
    "PixelFrame 10 Digital Frame": ["screen", "app", "setup", "Wi-Fi connection", "picture quality"],
    "Orbit Smart Watch": ["battery", "heart-rate sensor", "strap", "screen", "sleep tracking"],
    "Cedar Cast Iron Skillet": ["seasoning", "weight", "heat retention", "handle", "size"],
    "Breeze Tower Fan": ["airflow", "noise", "remote", "oscillation", "timer"],
    "Quill Fountain Pen": ["nib", "ink flow", "weight", "cap", "converter"],
}

POS_ADJ = ["excellent", "great", "fantastic", "really good", "spot on", "better than expected", "superb"]
NEG_ADJ = ["terrible", "poor", "disappointing", "awful", "flimsy", "useless", "worse than advertised"]
NEU_ADJ = ["fine", "okay", "average", "as described", "acceptable", "nothing special"]

POS_OPEN = ["Love it.", "Very happy with this purchase.", "Five stars from me.", "Does exactly what it says.",
            "Bought this as a gift and ended up getting one for myself.", "Best purchase this year.",
            "Highly recommend."]
NEG_OPEN = ["Really disappointed.", "Would not buy again.", "Returned it after a week.",
            "Save your money.", "Not worth the price.", "Stopped working after a month."]
NEU_OPEN = ["It's okay.", "Does the job.", "Arrived on time, works as expected.", "Nothing to complain about, nothing to rave about.",
            "Decent for the price."]
POS_CLOSE = ["Would buy again.", "Worth every penny.", "Already recommended it to friends.", "No regrets."]
NEG_CLOSE = ["Customer service never replied.", "Asked for a refund.", "Going back to my old one.",
             "One star is generous."]
NEU_CLOSE = ["We'll see how it holds up.", "Might update this review later.", "You get what you pay for.",
             "Fine if you don't expect too much."]
EMOJI = {"positive": ["😍", "👍", "🔥", "❤️", "🙌", "⭐⭐⭐⭐⭐"], "negative": ["😡", "👎", "😤", "🙄", "💸"],
         "neutral": ["🤷", "😐", "🙂"], "mixed": ["🤔", "😕", "😅"]}

# hand-written reviews in other languages: (sentiment, text)
FOREIGN_REVIEWS = [
    ("positive", "Muy buen producto, llegó rápido y funciona perfecto. ¡Lo recomiendo!"),
    ("negative", "Se rompió a las dos semanas. No lo compren."),
    ("mixed", "La calidad es buena, pero el precio es demasiado alto para lo que ofrece."),
    ("positive", "Très satisfait, la qualité est au rendez-vous. Je recommande sans hésiter."),
    ("negative", "Produit décevant, rien à voir avec la description. Retourné."),
    ("neutral", "Correct, sans plus. Livraison dans les délais."),
    ("positive", "Super Qualität, schnelle Lieferung. Gerne wieder!"),
    ("negative", "Leider nach drei Tagen defekt. Der Kundenservice antwortet nicht."),
    ("mixed", "Funktioniert gut, aber die Anleitung ist nur auf Englisch und sehr knapp."),
    ("positive", "Produto excelente, chegou antes do prazo. Muito satisfeito!"),
    ("neutral", "Cumpre o que promete. Nada de especial."),
    ("positive", "とても使いやすいです。デザインも気に入っています。"),
    ("negative", "すぐに壊れました。残念です。"),
    ("mixed", "Ottimo design, ma la batteria dura poco."),
    ("positive", "Świetny produkt, polecam każdemu!"),
    ("negative", "Качество ужасное, не рекомендую."),
]


def sentiment_for_rating(rng: random.Random, rating: int) -> str:
    table = {
        5: [("positive", 88), ("mixed", 10), ("neutral", 2)],
        4: [("positive", 62), ("mixed", 30), ("neutral", 8)],
        3: [("neutral", 45), ("mixed", 45), ("negative", 5), ("positive", 5)],
        2: [("negative", 62), ("mixed", 33), ("neutral", 5)],
        1: [("negative", 92), ("mixed", 6), ("positive", 2)],  # the odd 1-star rave: a mis-click
    }
    labels, weights = zip(*table[rating])
    return rng.choices(labels, weights)[0]


def _is(aspect: str) -> str:
    return "are" if aspect.endswith("s") and not aspect.endswith(("ss", "us")) else "is"


def review_text(rng: random.Random, product: str, sentiment: str) -> str:
    aspects = rng.sample(REVIEW_PRODUCTS[product], 3)
    short = product.split(" ")[0]
    if sentiment == "positive":
        parts = [rng.choice(POS_OPEN), f"The {aspects[0]} {_is(aspects[0])} {rng.choice(POS_ADJ)}."]
        if rng.random() < 0.6:
            parts.append(f"The {aspects[1]} {_is(aspects[1])} {rng.choice(POS_ADJ)} too.")
        if rng.random() < 0.5:
            parts.append(rng.choice(POS_CLOSE))
    elif sentiment == "negative":
        parts = [rng.choice(NEG_OPEN), f"The {aspects[0]} {_is(aspects[0])} {rng.choice(NEG_ADJ)}."]
        if rng.random() < 0.6:
            parts.append(f"And the {aspects[1]}? {capitalise_first(rng.choice(NEG_ADJ))}.")
        if rng.random() < 0.5:
            parts.append(rng.choice(NEG_CLOSE))
    elif sentiment == "neutral":
        parts = [rng.choice(NEU_OPEN), f"The {aspects[0]} {_is(aspects[0])} {rng.choice(NEU_ADJ)}."]
        if rng.random() < 0.5:
            parts.append(f"The {aspects[1]} {_is(aspects[1])} {rng.choice(NEU_ADJ)}, as you'd expect at this price.")
        if rng.random() < 0.4:
            parts.append(rng.choice(NEU_CLOSE))
    else:  # mixed
        good, bad = aspects[0], aspects[1]
        form = rng.randrange(3)
        if form == 0:
            parts = [f"The {good} {_is(good)} {rng.choice(POS_ADJ)}, but the {bad} {_is(bad)} {rng.choice(NEG_ADJ)}."]
        elif form == 1:
            parts = [f"Love the {good}.", f"Hate the {bad}: {rng.choice(NEG_ADJ)}, honestly."]
        else:
            parts = [f"Mixed feelings about the {short}.", f"{capitalise_first(good)}: {rng.choice(POS_ADJ)}.",
                     f"{capitalise_first(bad)}: {rng.choice(NEG_ADJ)}."]
        if rng.random() < 0.4:
            parts.append(rng.choice(["Keeping it for now.", "Three stars feels right.",
                                     "Would be perfect if they fixed that."]))
    text = " ".join(parts)
    if rng.random() < 0.14:
        text += " " + rng.choice(EMOJI[sentiment])
    if rng.random() < 0.05:
        text = text.upper() if sentiment == "negative" else text.lower()
    return text


def make_reviews(rng: random.Random) -> list:
    rows = []
    rid = 5000
    products = list(REVIEW_PRODUCTS)
    for _ in range(N_REVIEWS):
        rid += rng.randint(1, 29)
        product = rng.choice(products)
        rating = rng.choices([1, 2, 3, 4, 5], [12, 9, 14, 25, 40])[0]
        if rng.random() < 0.06:
            sentiment, text = rng.choice(FOREIGN_REVIEWS)
            # keep the rating roughly consistent with the foreign text
            rating = {"positive": rng.choice([4, 5]), "negative": rng.choice([1, 2]),
                      "neutral": 3, "mixed": rng.choice([2, 3, 4])}[sentiment]
        else:
            text = review_text(rng, product, sentiment_for_rating(rng, rating))
        rows.append({"review_id": rid, "product": product, "rating": rating, "review_text": text})
    return rows


# =============================================================================================
# articles.parquet
# =============================================================================================

CITIES = ["Lisbon", "Nairobi", "Rotterdam", "Osaka", "Montréal", "Wrocław", "Valparaíso", "Adelaide",
          "Tallinn", "Accra", "Bergen", "Porto Alegre", "Leeds", "Kraków", "Cork", "Hamburg"]
FIRST = ["Amelia", "Tomasz", "Ingrid", "Kofi", "Lucía", "Hiroshi", "Marta", "Daniel", "Aisha", "Pieter",
         "Sofía", "Rahul", "Eleni", "Jonas", "Chiara", "Samuel", "Yara", "Mikko"]
LAST = ["Okonkwo", "Lindqvist", "Moreau", "Tanaka", "Kowalczyk", "Ferreira", "Haddad", "Brennan",
        "Sørensen", "Nakamura", "Rossi", "Adeyemi", "Varga", "Mendes", "Kaur", "Ivanova", "Dubois"]

# Each section: slot choices, titles (template, indices of sentences the story must then include),
# and sentences in narrative order (0 = the lede, always used). An article keeps the lede, the
# sentences its title needs, and a random share of the rest, in order, within 120–400 words.
SECTIONS = {
    "Business": {
        "slots": {
            "org": ["Northwind Logistics", "Halvorsen Foods", "Meridian Bank", "Brightline Retail",
                    "Kestrel Airlines", "Solace Telecom", "Ironbridge Steel", "Pinewood Pharmacies"],
            "metric": ["revenue", "operating profit", "online sales", "net income"],
            "role": ["the company's chief executive", "its finance director", "its chief operating officer"],
        },
        "titles": [
            ("{org} {metric} {direction} {pct}% as {cause}", [1]),
            ("{org} to cut {n} jobs in {city} as it seeks savings", [5, 6]),
            ("{org} shares {direction2} after quarterly update", [3]),
            ("Investors cautious as {org} reports mixed quarter", [3, 12]),
        ],
        "sentences": [
            "{org} said on {weekday} that its {metric} {direction} {pct}% in the third quarter compared with a year earlier.",
            "The company pointed to {cause_noun}, and said the outlook for next year was uncertain.",
            "Costs rose faster than prices, with energy and wages the biggest items.",
            "Analysts had expected a smaller change, and the shares {direction2} {pct2}% in early trading.",
            "\"We are making the hard decisions now so that the business is stronger in two years,\" said {person}, {role}.",
            "As part of a savings plan, the company intends to cut about {n} jobs at its site in {city}, out of a workforce of around {n_big}.",
            "Unions said they had not been consulted and would seek urgent talks with management.",
            "{person} declined to say whether further job cuts were being considered.",
            "The company also confirmed it would keep its dividend unchanged, a move welcomed by long-standing shareholders.",
            "The results come a month after a rival reported similar pressure on margins.",
            "Some analysts questioned whether the savings plan went far enough.",
            "Others pointed to a strong order book as a sign that demand was holding up.",
            "Trading volumes in the stock were roughly three times the daily average.",
            "Consumer groups said customers should not bear the cost of the turnaround through higher prices or fees.",
            "The company has been investing heavily in automation and in its online business, which now accounts for more than a third of sales.",
            "It also said it was in talks to sell a smaller division, without naming possible buyers.",
            "Credit-rating agencies said they would review the figures but saw no immediate reason to change their assessment.",
            "Shareholders will vote on a new pay policy for senior managers at the annual meeting.",
            "The company will give a fuller update at an investor day in {city} in the spring.",
        ],
    },
    "Technology": {
        "slots": {
            "org": ["Quantile", "Hexwave", "OpenLattice", "Bytefield", "Corvid Labs", "Tessellate"],
            "product": ["a new laptop chip", "an open-source database", "a messaging app", "a home battery",
                        "a smart-glasses prototype", "a cloud storage service"],
            "role": ["{org}'s chief technology officer", "the company's head of product", "a co-founder of {org}"],
        },
        "titles": [
            ("{org} unveils {product} aimed at small businesses", []),
            ("Outage at {org} disrupts {service} for hours", [9, 10]),
            ("{org} opens engineering hub in {city}", [7, 8]),
            ("Regulator questions {org} over data handling", [13, 14]),
        ],
        "sentences": [
            "{org} on {weekday} unveiled {product}, which it says will be available in {n_small} countries by the summer.",
            "The company says early testers reported {a_pct} improvement in battery life or speed, depending on the model, over the previous version.",
            "\"People told us the old version was too complicated, so we started again,\" said {person}, {role}.",
            "Independent reviewers have not yet been able to verify the performance claims.",
            "Pricing starts at {price} a month, with discounts for schools and charities.",
            "The launch comes as competition in the sector intensifies and prices fall.",
            "Developers welcomed the promise of an open programming interface, though some questioned the terms of use.",
            "{org} was founded in {year} and now employs about {n_big} people worldwide.",
            "It also announced a new engineering hub in {city}, where it expects to hire {n} people over three years.",
            "Separately, an outage on {weekday} left customers without {service} for several hours.",
            "The company blamed a faulty configuration change and said it had added checks to stop the same mistake from happening again.",
            "Privacy campaigners said they wanted more detail on what data the product collects.",
            "The company said all customer data would be stored in the region where customers live.",
            "The data-protection regulator in {city} said it had asked the company for information and would decide whether to open a formal inquiry.",
            "{org} said it was cooperating fully and was confident it had complied with the law.",
            "Industry analysts said the move put pressure on larger rivals, which have been slower to cut prices.",
            "The company has raised money from investors twice in the past two years and is not yet profitable.",
            "Customers who signed up for the beta will be moved to the new version automatically.",
            "Support for older devices will end next year, the company said.",
        ],
    },
    "Science": {
        "slots": {
            "org": ["the University of {city}", "{city} University", "the {city} Institute of Natural Sciences"],
            "subject": ["a deep-sea coral reef", "a distant exoplanet", "an ancient river bed",
                        "a population of migratory bats", "a previously unknown species of beetle"],
            "role": ["the study's lead author", "a professor of ecology on the team", "a research fellow who worked on the project"],
        },
        "titles": [
            ("Researchers map {subject} in unprecedented detail", []),
            ("Scientists report surprising results from study of {subject}", [2]),
            ("Team at {org} describes {subject}", []),
            ("New study of {subject} divides experts", [4, 11]),
        ],
        "sentences": [
            "A team at {org} has described {subject} in a study published on {weekday}.",
            "The researchers spent {n_small} months collecting data, using instruments designed by the team itself.",
            "\"We were not expecting anything like this, and we checked the results many times,\" said {person}, {role}.",
            "The study estimates an uncertainty of about {pct}% in its main figure.",
            "The findings have been peer reviewed, but other scientists cautioned that the sample was small.",
            "Similar studies in the past have produced conflicting results.",
            "The team combined field measurements with computer models to fill gaps in the record.",
            "Local volunteers helped with the fieldwork, the authors said.",
            "The work was funded by a public research council and a private foundation.",
            "If confirmed, the results could change how researchers model the system.",
            "Data from the project will be made freely available to other researchers.",
            "An independent expert described the paper as careful and well argued, but said the conclusions went slightly beyond the evidence.",
            "The authors acknowledge that limitation in the paper and call for larger studies.",
            "They also say that the methods could be applied cheaply elsewhere.",
            "The team now plans to repeat the measurements at {n_small} other sites.",
            "Further results are expected next year.",
        ],
    },
    "Health": {
        "slots": {
            "org": ["the regional health authority", "the city hospital trust", "the national health agency"],
            "topic": ["flu vaccinations", "waiting times for knee surgery", "a new screening programme",
                      "mental-health services for teenagers", "ambulance response times"],
            "role": ["the medical director", "the chief nurse", "the public-health lead"],
        },
        "titles": [
            ("New figures on {topic} published ahead of winter", []),
            ("{city} lags national figures on {topic}", [4]),
            ("Officials under pressure over {topic}", [11]),
            ("Health officials urge patience over {topic}", [5]),
        ],
        "sentences": [
            "Figures released on {weekday} by {org} show a change of {pct}% in {topic} over the past year.",
            "Officials said the numbers reflected both higher demand and staff shortages.",
            "\"Our staff are working incredibly hard, but the system is stretched,\" said {person}, {role}.",
            "Patient groups said the national average hid wide differences between areas.",
            "In {city}, the average wait was about {n_small} weeks longer than the national figure.",
            "The government said extra funding announced in the spring would take time to have an effect.",
            "Doctors urged people to use pharmacies and helplines for minor problems.",
            "A pilot scheme offering evening and weekend appointments will be extended to {n_small} more clinics.",
            "Early results from the pilot suggest that fewer patients miss their appointments when they can choose a later time.",
            "Experts said the long-term solution was to train and keep more staff.",
            "Nursing unions said pay had not kept up with living costs and that many experienced staff were leaving.",
            "Opposition politicians called the figures a warning sign.",
            "Health officials stressed that emergency care remained available for anyone who needed it.",
            "The authority also plans to publish figures for each hospital, so patients can compare them.",
            "The figures will be reviewed again in three months.",
        ],
    },
    "Sports": {
        "slots": {
            "team": ["{city} United", "{city} Rovers", "Atlético {city}", "the {city} Hawks"],
            "role": ["the head coach", "the club captain", "the sporting director"],
        },
        "titles": [
            ("{team} snatch late win to stay top", [3]),
            ("{team} sweat on injury after narrow win", [5]),
            ("Record crowd sees {team} edge rivals", [1]),
            ("{team} keep cool in title race", [3]),
        ],
        "sentences": [
            "{team} beat their rivals {score} on {weekday}, a result that keeps them in the hunt for the title.",
            "A crowd of {n_big} watched the match, the club's biggest attendance since the stadium was rebuilt.",
            "Their opponents had the better of the first half but could not turn pressure into goals.",
            "The decisive moment came in the final minutes, when a substitute scored from a tight angle, and the win keeps the club {n_small} points clear at the top.",
            "\"The players never stopped believing, and that's what I'm proudest of,\" said {person}, {role}.",
            "The club later confirmed that its top scorer would miss several weeks with a hamstring injury.",
            "That leaves a thin squad facing a busy run of fixtures before the winter break.",
            "Fans have criticised the board for a lack of investment in the squad.",
            "The board says it will spend in the transfer window if the right players are available.",
            "The coach has been in charge for {n_small} seasons and has won the league once.",
            "The next match is away from home, against a side unbeaten in six games.",
            "Ticket prices for the cup run have been frozen, the club said.",
            "Local businesses reported a busy weekend as supporters travelled to the match.",
            "Police said the day had passed without any serious incidents.",
        ],
    },
    "Culture": {
        "slots": {
            "work": ["a new opera", "a retrospective of a local painter", "a stage adaptation of a debut novel",
                     "a documentary film", "a folk music festival"],
            "venue": ["the {city} Concert Hall", "the Municipal Gallery", "the Harbour Theatre", "the Old Mill arts centre"],
            "role": ["the artistic director", "the curator", "one of the organisers"],
        },
        "titles": [
            ("{work_cap} opens to packed house in {city}", []),
            ("Critics divided over {work} at {venue_bare}", [3]),
            ("{venue_cap} reopens with {work}", [4]),
            ("{work_cap} draws record numbers in {city}", [6]),
        ],
        "sentences": [
            "{work_cap} opened at {venue} on {weekday}, with tickets for the first week selling out within hours.",
            "The project was two years in the making and involves more than {n_small}0 artists, technicians and volunteers.",
            "\"We wanted to make something that people who never come to the theatre or the gallery would enjoy,\" said {person}, {role}.",
            "Critics were divided: some praised its ambition, while others found it overlong.",
            "The venue had been closed for two years for renovation and now has step-free access throughout.",
            "Admission on the opening weekend was free for residents.",
            "Organisers said {n_big} people had attended over the weekend, a record.",
            "Local schools will receive free tickets as part of an education programme.",
            "The project was funded partly by the city council and partly by private donors.",
            "Some neighbours complained about noise late at night, and the council has promised to monitor it.",
            "The production will tour to {n_small} other cities next year.",
            "A second run has been scheduled for the spring.",
        ],
    },
    "World": {
        "slots": {
            "org": ["the United Nations", "the European Commission", "the African Union", "regional governments"],
            "issue": ["a prolonged drought", "severe flooding", "a cholera outbreak", "a shortage of grain",
                      "wildfires along the coast"],
            "role": ["a spokesperson for the delegation", "the foreign minister", "a relief coordinator"],
        },
        "titles": [
            ("Aid agencies scale up response to {issue}", [1, 5]),
            ("Donors meet again over {issue} after three-month pause", [4]),
            ("Leaders meet in {city} to discuss {issue}", []),
            ("Funding gap hampers response to {issue}", [6]),
        ],
        "sentences": [
            "Officials from {org} met in {city} on {weekday} for talks on {issue}.",
            "Aid agencies estimate that about {n_big} people have been affected.",
            "\"The priority now is to get help to people who need it, quickly,\" said {person}, {role}.",
            "Delegates described the talks as constructive but said there was no agreement yet on funding.",
            "The meeting was the first in three months, after earlier talks broke down.",
            "Emergency shelters have been set up in schools and sports halls, and agencies are bringing in water and food.",
            "Several countries have pledged money, but agencies say it covers less than half of what is needed.",
            "Roads into the worst-hit areas remain blocked, slowing deliveries.",
            "Weather forecasters expect conditions to ease within {n_small} days.",
            "Critics say the international response has been too slow.",
            "Observers said a long-term funding agreement before the end of the year was unlikely.",
            "Another round of talks is planned for next month.",
        ],
    },
    "Local": {
        "slots": {
            "project": ["a new tram line", "the redesign of the riverside park", "a cycle lane on the high street",
                        "the closure of the public library", "a housing development on the old factory site"],
            "role": ["a local councillor", "the city's mayor", "chair of the residents' association"],
            "org": ["the city council", "the planning committee", "the transport authority"],
        },
        "titles": [
            ("Residents split over plans for {project}", [3, 4]),
            ("Green light for {project} after heated debate", []),
            ("{project_cap}: work to start in spring", [5]),
            ("Petition against {project} gathers {n_big} signatures", [4]),
        ],
        "sentences": [
            "{org_cap} voted on {weekday} to go ahead with {project} in {city}, despite objections from some residents.",
            "The plans have been revised twice after public consultations.",
            "\"This will make the area better for everyone who lives and works here,\" said {person}, {role}.",
            "Opponents say the project will increase traffic and noise, and that the money would be better spent elsewhere.",
            "A petition against the scheme has gathered more than {n_big} signatures.",
            "Work is expected to start in the spring and last about {n_small} months.",
            "The cost is estimated at {price_big}, most of it from a national fund.",
            "Local shop owners are worried about disruption during construction.",
            "Supporters point to similar projects in other cities that have proved popular.",
            "Some residents said they had not been told about the consultation.",
            "The council said it would publish a full timetable before work begins.",
            "A public meeting will be held at the town hall next week.",
        ],
    },
}

# sentence index -> the earlier sentence it only makes sense after (dropped without it)
DEPENDS = {
    "Business": {6: 5, 7: 5, 10: 5, 11: 10},
    "Technology": {10: 9, 14: 13},
    "Science": {12: 11},
    "Health": {8: 7},
    "Sports": {6: 5, 8: 7},
}

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


CAUSES = {"rose": [("online sales surge", "a surge in online sales"),
                   ("price rises stick", "price rises that customers have largely accepted")],
          "fell": [("energy costs bite", "higher energy costs"),
                   ("demand slows", "slowing demand in its main markets")]}


def article_slots(rng: random.Random, section: dict) -> dict:
    city = rng.choice(CITIES)
    direction = rng.choice(["rose", "fell"])
    cause, cause_noun = rng.choice(CAUSES[direction])
    slots = {
        "city": city,
        "weekday": rng.choice(WEEKDAYS[:5]),
        "person": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "pct": (pct := rng.choice([2, 3, 4, 6, 8, 11, 12, 15, 18, 23])),
        "a_pct": f"{'an' if pct in (8, 11, 18) else 'a'} {pct}%",
        "pct2": rng.choice([1.5, 2.4, 3.1, 4.8, 6.2, 9.7]),
        "n": rng.choice([120, 250, 400, 650, 900, 1200]),
        "n_big": f"{rng.choice([3, 8, 12, 18, 25, 40, 55])},{rng.randint(0, 999):03d}",
        "n_small": rng.choice([3, 4, 5, 6, 7, 9, 12]),
        "year": rng.randint(1998, 2021),
        "price": rng.choice(["€4", "€9", "$12", "£6"]),
        "price_big": rng.choice(["€38 million", "€120 million", "€9.5 million", "€61 million"]),
        "score": rng.choice(["2-1", "3-2", "1-0", "4-3", "78-74", "24-19"]),
        "direction": direction,
        "direction2": rng.choice(["jumped", "rallied"] if direction == "rose" else ["slid", "fell"]),
        "cause": cause,
        "cause_noun": cause_noun,
        "service": rng.choice(["email", "payments", "video calls", "file storage"]),
    }
    for key, options in section["slots"].items():  # later slots may refer to earlier ones
        slots[key] = rng.choice(options).format_map(slots)
    for key in ("org", "work", "venue", "project"):
        if key in slots:
            slots[key + "_cap"] = capitalise_first(slots[key])
    if "venue" in slots:
        slots["venue_bare"] = slots["venue"].removeprefix("the ")
    return slots


def make_articles(rng: random.Random) -> list:
    rows = []
    dates = dates_between(rng, dt.date(2026, 9, 1), dt.date(2026, 11, 20), N_ARTICLES)
    names = list(SECTIONS)
    for i, published in enumerate(dates, start=1):
        name = rng.choice(names)
        section = SECTIONS[name]
        slots = article_slots(rng, section)
        title_tpl, needed = rng.choice(section["titles"])
        title = capitalise_first(fill(title_tpl, slots))
        texts = [fill(t, slots) for t in section["sentences"]]
        words = [len(t.split()) for t in texts]
        keep_share = rng.uniform(0.4, 1.0)
        keep = {0, *needed} | {j for j in range(1, len(texts)) if rng.random() < keep_share}
        deps = DEPENDS.get(name, {})

        def settle() -> None:  # drop sentences whose antecedent is gone
            for j in sorted(keep):
                if j in deps and deps[j] not in keep:
                    keep.discard(j)

        settle()
        while sum(words[j] for j in keep) < 120:
            addable = [j for j in range(1, len(texts)) if j not in keep and deps.get(j, 0) in keep]
            if not addable:
                break
            keep.add(addable[0])
        droppable = sorted(keep - {0, *needed} - set(deps.values()))
        while sum(words[j] for j in keep) > 400 and droppable:
            keep.discard(droppable.pop(rng.randrange(len(droppable))))
            settle()
        sentences = [texts[j] for j in sorted(keep)]
        # paragraphs of 1–3 sentences, as a news site would lay them out
        paras, j = [], 0
        while j < len(sentences):
            step = rng.choice([1, 2, 2, 3])
            paras.append(" ".join(sentences[j:j + step]))
            j += step
        body = "\n\n".join(paras)
        rows.append({"article_id": f"a-{i:04d}", "published": published, "section": name,
                     "title": title, "body": body})
    return rows


# =============================================================================================

def write_csv(path: Path, rows: list) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    tickets = make_tickets(random.Random(SEED))
    reviews = make_reviews(random.Random(SEED + 1))
    articles = make_articles(random.Random(SEED + 2))
    write_csv(HERE / "tickets.csv", tickets)
    write_csv(HERE / "reviews.csv", reviews)
    schema = pa.schema([("article_id", pa.string()), ("published", pa.date32()), ("section", pa.string()),
                        ("title", pa.string()), ("body", pa.string())])
    table = pa.Table.from_pylist(articles, schema=schema)
    pq.write_table(table, HERE / "articles.parquet", compression="zstd")
    print(f"tickets.csv: {len(tickets)} rows, reviews.csv: {len(reviews)} rows, "
          f"articles.parquet: {len(articles)} rows")


if __name__ == "__main__":
    main()
