"""Generate the committed sample data from original templates (no downloaded text).

    python -m data_prep.samples.generate        # rewrites the files next to this script

Domain documents also state the knowledge the shipped exams (eval/exams/<domain>.jsonl) test:
every question's topic and its correct answer, in varied paraphrases (``FACT_TEMPLATES``),
never the question or answer sentence itself; every statement is checked against the 13-gram
decontamination index (data_prep/decontam.py) so the filter keeps it. Pages of other topics
state none of it, so the general corpus holds each fact only at the domain's share of the web.

Outputs (deterministic for a given seed):
  seed_labeled.jsonl   labeled seed set: {"id", "text", "label"} over legal/medical/accounting/other
  web_sample.jsonl     a mixed "web" sample: {"id", "text", "url"}; includes a few bad lines on purpose
                       (malformed JSON, missing text, empty text) to show the drop accounting
  web_mirror.jsonl     a second "crawl" for the full pipeline (configs/data/sample_full.yaml): exact and
                       edited copies of web_sample pages (dedup), Portuguese and Spanish pages (language)
  exam_sample.jsonl    a handful of exam items ({"id", "domain", "question", "choices", "answer"}) used by
                       the sample filter config for decontamination; the real exams belong to eval/
"""
from __future__ import annotations

import itertools
import json
import os
import random
import re

HERE = os.path.dirname(os.path.abspath(__file__))

PEOPLE = ["the tenant", "the landlord", "the plaintiff", "the defendant", "the employer", "the contractor",
          "the buyer", "the seller", "the company", "the applicant", "the trustee", "the licensee"]
LEGAL = {
    "nouns": ["contract", "lease", "statute", "clause", "indemnity", "injunction", "tort", "easement",
              "jurisdiction", "appeal", "covenant", "warranty", "liability", "arbitration", "subpoena",
              "affidavit", "precedent", "remedy", "breach", "damages", "verdict", "ordinance", "testimony",
              "counsel", "court", "tribunal", "plea", "motion", "summary judgment", "due process"],
    "sentences": [
        "{P} argued that the {n1} was void because the {n2} had never been signed by both parties.",
        "Under the {n1}, {p} must give written notice within thirty days before seeking any {n2}.",
        "The court of appeal held that the {n1} did not survive the termination of the {n2}.",
        "Counsel for {p} filed a motion to dismiss, claiming the tribunal lacked {n1} over the {n2}.",
        "A {n1} is enforceable only if it is reasonable in scope, duration and geography, the judge noted.",
        "The jury returned a verdict finding {p} liable for {n1} and awarded compensatory {n2}.",
        "When interpreting a {n1}, courts look first to the plain meaning of its words and then to the {n2}.",
        "The {n1} clause shifted the risk of third-party claims onto {p}, subject to a cap on {n2}.",
        "Because the statute of limitations had run, the claim for {n1} was barred regardless of the {n2}.",
        "{P} sought an injunction to stop the neighbour from blocking the {n1} recorded in the deed.",
        "The parties agreed to binding {n1}, waiving their right to a jury trial on any {n2}.",
        "An affidavit from the witness was admitted, although opposing counsel objected to it as hearsay.",
        "The appellate panel reversed, finding that the lower court misapplied the {n1} standard.",
        "Good faith and fair dealing are implied in every {n1}, even where the {n2} is silent.",
        "The ordinance was challenged as unconstitutional for denying {p} due process before the {n1}.",
    ],
}
MEDICAL = {
    "nouns": ["diagnosis", "dosage", "symptom", "infection", "antibiotic", "biopsy", "hypertension",
              "insulin", "vaccine", "prognosis", "therapy", "fracture", "inflammation", "anemia", "tumor",
              "cardiac arrest", "blood pressure", "clinical trial", "side effect", "outpatient clinic",
              "pneumonia", "migraine", "asthma", "dialysis", "sepsis", "ultrasound", "MRI scan", "referral"],
    "sentences": [
        "The patient presented with fever and persistent cough, and the physician suspected {n1}.",
        "A daily {n1} of the medication was titrated upward until the {n2} was under control.",
        "Laboratory results confirmed {n1}, so the team started intravenous {n2} the same evening.",
        "Nurses monitored vital signs every four hours, watching for any {n1} after the procedure.",
        "The randomized {n1} compared the new {n2} with placebo in adults over sixty-five.",
        "Chronic {n1} raises the risk of stroke, so clinicians recommend lifestyle changes and {n2}.",
        "After the {n1} came back negative, the oncologist revised the {n2} and scheduled follow-up.",
        "Children should receive the {n1} before school age unless a documented allergy prevents it.",
        "The emergency physician ordered an {n1} to rule out internal bleeding after the accident.",
        "Patients with {n1} were advised to carry a rescue inhaler and avoid known triggers.",
        "Dosing must be adjusted for kidney function, especially in elderly patients on {n1}.",
        "The discharge summary listed the {n1}, current medications and the plan for {n2}.",
        "Early signs of {n1} include confusion, rapid heart rate and low {n2}.",
        "The surgeon explained the risks of anesthesia and obtained informed consent before the {n1}.",
        "Physical therapy twice a week helped the patient recover mobility after the {n1}.",
    ],
}
ACCOUNTING = {
    "nouns": ["ledger", "balance sheet", "accrual", "depreciation", "invoice", "audit", "revenue",
              "receivable", "payable", "journal entry", "trial balance", "amortization", "cash flow",
              "general ledger", "tax return", "inventory", "goodwill", "equity", "dividend", "expense",
              "reconciliation", "write-off", "income statement", "fiscal year", "working capital", "GAAP"],
    "sentences": [
        "At month end the bookkeeper posted an {n1} to record wages earned but not yet paid.",
        "Straight-line {n1} spreads the cost of the machine evenly over its useful life.",
        "The auditor traced each {n1} to the {n2} and found two unrecorded transactions.",
        "Accounts {n1} rose sharply, which tied up working capital and slowed {n2}.",
        "Under accrual accounting, {n1} is recognized when earned, not when cash is received.",
        "The controller prepared a bank {n1} and adjusted the {n2} for outstanding checks.",
        "A debit to {n1} and a credit to cash records the payment of the supplier {n2}.",
        "The company reported higher {n1} in its {n2} for the third quarter of the fiscal year.",
        "Inventory was valued at the lower of cost and net realizable value, triggering a {n1}.",
        "The {n1} must balance: total assets equal total liabilities plus shareholders' {n2}.",
        "Before closing the books, the team ran a {n1} to confirm that debits equal credits.",
        "Impairment testing showed that the {n1} from the acquisition exceeded its fair value.",
        "The firm capitalized the software costs and began {n1} once the system went live.",
        "Deferred {n1} appears as a liability until the service is delivered to the customer.",
        "The tax accountant reconciled book income with taxable income on the corporate {n1}.",
    ],
}
OTHER = {
    "nouns": ["recipe", "garden", "marathon", "guitar", "hiking trail", "smartphone", "football match",
              "painting", "novel", "weekend trip", "bicycle", "coffee", "camera", "playlist", "puzzle",
              "video game", "birthday party", "sourdough bread", "tomato plants", "museum", "concert",
              "road trip", "laptop", "chess opening", "yoga class", "podcast", "fishing boat"],
    "sentences": [
        "We spent the morning on the {n1} and stopped for {n2} at a small village cafe.",
        "This {n1} needs only five ingredients and takes about twenty minutes to prepare.",
        "The team scored twice in the second half to win the {n1} in front of a loud crowd.",
        "Water the {n1} early in the day so the leaves dry before evening.",
        "My new {n1} has a better battery, but the {n2} app still crashes now and then.",
        "She practiced the {n1} every evening for a month before the school {n2}.",
        "The {n1} follows a family of three generations through a long and snowy winter.",
        "If you are training for a {n1}, increase your weekly distance by no more than ten percent.",
        "The {n1} reopened after renovation with a new wing devoted to modern sculpture.",
        "Pack light layers, a rain jacket and plenty of water for the {n1}.",
        "The band played old favourites at the {n1} and the audience sang along.",
        "Adjust the saddle height on your {n1} so your knee is slightly bent at the bottom.",
        "Our book club picked a {n1} about a detective who solves crimes in a seaside town.",
        "Let the dough rise overnight in the fridge for a deeper flavour in the {n1}.",
        "Kids loved the treasure hunt at the {n1}, and nobody wanted to go home.",
    ],
}
DOMAINS = {"legal": LEGAL, "medical": MEDICAL, "accounting": ACCOUNTING, "other": OTHER}
# Sentences any web page may contain; they make the task less trivial.
GENERIC = [
    "Please read the whole article before leaving a comment below.",
    "Last updated on a Tuesday; some details may have changed since then.",
    "Share this page with anyone who might find it useful.",
    "In this post we explain the basics step by step.",
    "Many readers asked us to write about this topic in more detail.",
    "Subscribe to our newsletter for weekly updates.",
    "The information here is general and may not fit every situation.",
    "We would like to thank everyone who sent questions and feedback.",
    "Here is a short summary of the key points.",
    "Contact us if you notice any mistakes in this text.",
]
# Words that appear across domains (a "case", a "record", an "account"...).
CROSS = [
    "Keep a careful record of every case and every account.",
    "The review took longer than planned because the file was incomplete.",
    "A second opinion is often worth the extra cost and time.",
    "The report was filed late but accepted after a short delay.",
]


EXAM_DIR = os.path.join(HERE, os.pardir, os.pardir, "eval", "exams")
FACTS_PER_DOC = (6, 12)
# One fact = a question's topic words + its correct answer, kept verbatim (the cloze exam
# scores " " + answer text as the continuation). No template repeats the question sentence.
FACT_TEMPLATES = [
    "On {topic}, the rule worth remembering is this: {answer}.",
    "Notes on {subject} keep returning to {topic}. {answer}.",
    "Ask a practitioner about {topic} and you will hear: {answer}.",
    "Q: {topic}? Answer: {answer}.",
    "Students of {subject} learn early what {topic} comes down to: {answer}.",
    "A quick reminder about {topic}. {answer}.",
    "Regarding {topic}, the textbooks agree: {answer}.",
    "Our {subject} revision sheet, on {topic}: {answer}.",
    "The point about {topic} is simple. {answer}.",
    "People often get {topic} wrong. The correct view: {answer}.",
]
_STOP = set("""a an the of to in on at for by with from and or but is are was were be been being
which what who whom whose when where why how does do did can could should would may might must
shall will this that these those its it it's their there under most usually typically called
known as into than then if any all some one true""".split())


def _topic(question: str, rng: random.Random) -> str:
    """The question's content words in order, some dropped: a topic, not the question."""
    ws = [w for w in re.findall(r"[\w'.-]+", question.rstrip("?")) if w.lower() not in _STOP]
    ws = [w.strip(".") for w in ws if w.strip(".")]
    if len(ws) > 4:
        drop = rng.sample(range(len(ws)), k=rng.randint(0, max(0, len(ws) - 4)) // 2)
        ws = [w for i, w in enumerate(ws) if i not in drop]
    return " ".join(ws[:8])


def exam_facts(domain: str, rng: random.Random, index) -> list[list[str]]:
    """Per question of eval/exams/<domain>.jsonl (all splits), a few paraphrased statements
    of its topic and correct answer that the decontamination ``index`` keeps."""
    path = os.path.join(EXAM_DIR, f"{domain}.jsonl")
    facts = []
    for line in open(path, encoding="utf-8"):
        if not line.strip():
            continue
        item = json.loads(line)
        answer = item["choices"][item["answer"]].rstrip(".")
        if len(answer.split()) >= 13:  # verbatim it would be a 13-gram of the exam item
            answer = " ".join(answer.split()[:12])
        stated = []
        for tmpl in rng.sample(FACT_TEMPLATES, len(FACT_TEMPLATES)):
            text = tmpl.format(topic=_topic(item["question"], rng), answer=answer,
                               subject=item.get("subject") or domain)
            if index.match(text) is None:
                stated.append(text[0].upper() + text[1:])
        if len(stated) < 3:
            raise SystemExit(f"{path}: {item['id']}: fewer than 3 fact paraphrases pass the "
                             "13-gram decontamination; add templates")
        facts.append(stated)
    return facts


class FactPool:
    """Hands out each domain's facts round robin (every question stated about equally often),
    a different paraphrase on each pass."""

    def __init__(self, facts_by_domain: dict[str, list[list[str]]], rng: random.Random):
        self.cycles = {}
        for domain, facts in facts_by_domain.items():
            order = list(range(len(facts)))
            rng.shuffle(order)
            self.cycles[domain] = (facts, itertools.cycle(order), {})

    def take(self, domain: str) -> str | None:
        if domain not in self.cycles:
            return None
        facts, order, passes = self.cycles[domain]
        i = next(order)
        passes[i] = passes.get(i, -1) + 1
        return facts[i][passes[i] % len(facts[i])]


FACTS: FactPool | None = None  # set by generate()


def make_doc(rng: random.Random, domain: str, n_sent: tuple[int, int] = (3, 7)) -> str:
    spec = DOMAINS[domain]
    k = rng.randint(*n_sent)
    sents = []
    for _ in range(k):
        tmpl = rng.choice(spec["sentences"])
        n1, n2 = rng.sample(spec["nouns"], 2)
        p = rng.choice(PEOPLE)
        sents.append(tmpl.format(n1=n1, n2=n2, p=p, P=p[0].upper() + p[1:]))
    if FACTS is not None and n_sent[1] > 1:  # not in the one-line asides of mixed pages
        for _ in range(rng.randint(*FACTS_PER_DOC)):
            fact = FACTS.take(domain)
            if fact:
                sents.insert(rng.randint(0, len(sents)), fact)
    for _ in range(rng.randint(0, 2)):
        sents.insert(rng.randint(0, len(sents)), rng.choice(GENERIC))
    if rng.random() < 0.3:
        sents.insert(rng.randint(0, len(sents)), rng.choice(CROSS))
    paras = []
    while sents:
        cut = rng.randint(1, 3)
        paras.append(" ".join(sents[:cut]))
        sents = sents[cut:]
    return "\n\n".join(paras)


def make_mixed_doc(rng: random.Random, main: str, other: str) -> str:
    """Mostly ``main`` with a sentence or two of ``other`` (realistic noise)."""
    return make_doc(rng, main) + "\n\n" + make_doc(rng, other, (1, 1))


def write_jsonl(path: str, rows) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(row if isinstance(row, str) else json.dumps(row, ensure_ascii=False))
            fh.write("\n")
            n += 1
    return n


EXAM_ITEMS = [
    {"id": "legal-001", "domain": "legal",
     "question": "Which doctrine allows a court to refuse enforcement of a contract term that was unfairly "
                 "one-sided and hidden in fine print at the time the agreement was signed by the weaker party?",
     "choices": ["Unconscionability", "Promissory estoppel", "Res judicata", "Adverse possession"], "answer": 0},
    {"id": "medical-001", "domain": "medical",
     "question": "A patient on long-term warfarin therapy starts a course of a macrolide antibiotic; which laboratory "
                 "value should be checked more often during the following two weeks to avoid bleeding?",
     "choices": ["INR", "Serum sodium", "HbA1c", "Creatinine kinase"], "answer": 0},
    {"id": "accounting-001", "domain": "accounting",
     "question": "A company receives cash in advance for a twelve month service contract; how should the payment be "
                 "recorded on the day the cash arrives in the bank account of the company?",
     "choices": ["As deferred revenue, a liability", "As revenue", "As equity", "As an expense"], "answer": 0},
]


def exam_text(item: dict) -> str:
    """The text a leaked exam item would show on the web: question and its correct answer."""
    return f"{item['question']} Answer: {item['choices'][item['answer']]}"


def generate(out_dir: str = HERE, seed: int = 1234, per_label: int = 100, web_docs: int = 600) -> dict:
    global FACTS
    from data_prep.decontam import ExamIndex

    rng = random.Random(seed)
    exam_files = sorted(os.path.join(EXAM_DIR, f) for f in os.listdir(EXAM_DIR) if f.endswith(".jsonl"))
    index = ExamIndex(exam_files, n=13)
    frng = random.Random(seed + 1)
    FACTS = FactPool({d: exam_facts(d, frng, index) for d in ("legal", "medical", "accounting")},
                     frng)
    labeled = []
    for label in DOMAINS:
        for i in range(per_label):
            if rng.random() < 0.15:
                other = rng.choice([d for d in DOMAINS if d != label])
                text = make_mixed_doc(rng, label, other)
            else:
                text = make_doc(rng, label)
            labeled.append({"id": f"seed-{label}-{i:03d}", "text": text, "label": label})
    rng.shuffle(labeled)
    n_lab = write_jsonl(os.path.join(out_dir, "seed_labeled.jsonl"), labeled)

    web = []
    weights = {"legal": 0.1, "medical": 0.1, "accounting": 0.06, "other": 0.74}
    for i in range(web_docs):
        label = rng.choices(list(weights), weights=list(weights.values()))[0]
        text = make_doc(rng, label, (2, 12)) if rng.random() > 0.2 else make_mixed_doc(
            rng, label, rng.choice(list(DOMAINS)))
        web.append({"id": f"web-{i:05d}", "text": text, "url": f"https://example.org/{label[:3]}/{i}"})
    # two pages that quote exam items (the decontamination step must remove them)
    for j, item in enumerate(EXAM_ITEMS[:2]):
        pos = rng.randint(0, len(web))
        web.insert(pos, {"id": f"web-leak-{j}", "url": f"https://example.org/quiz/{j}",
                         "text": make_doc(rng, item["domain"], (1, 2)) + "\n\nPractice question: "
                         + exam_text(item)})
    web_lines: list = list(web)
    web_lines.insert(50, '{"id": "web-bad-json", "text": "unterminated')
    web_lines.insert(120, {"id": "web-no-text", "body": "this record uses another field"})
    web_lines.insert(300, {"id": "web-empty", "text": "   "})
    n_web = write_jsonl(os.path.join(out_dir, "web_sample.jsonl"), web_lines)
    n_exam = write_jsonl(os.path.join(out_dir, "exam_sample.jsonl"), EXAM_ITEMS)
    n_mirror = write_mirror(out_dir, web, seed)
    return {"seed_labeled": n_lab, "web_sample": n_web, "exam_sample": n_exam, "web_mirror": n_mirror}


OTHER_LANGUAGE_PAGES = [
    ("pt", "O tribunal decidiu que o contrato de compra e venda era nulo, porque faltava a escritura pública "
           "exigida pela lei. As partes devem devolver o que receberam e o vendedor responde pelos prejuízos."),
    ("pt", "A paciente chegou ao hospital com febre alta e dor de cabeça. O médico pediu exames de sangue e "
           "recomendou repouso, muita água e acompanhamento diário até a melhora dos sintomas."),
    ("es", "El tribunal confirmó la sentencia y condenó a la empresa a pagar una indemnización a los "
           "trabajadores despedidos sin causa justificada durante el último año."),
]


def write_mirror(out_dir: str, web: list[dict], seed: int) -> int:
    """Mirrored pages (3 exact copies, 3 copies with one word changed, one of them a page quoting an
    exam item) and 3 pages in other languages, as a second crawl of the same sites would have."""
    rng = random.Random(seed + 1)
    long_pages = [w for w in web if len(w["text"].split()) >= 80 and not w["id"].startswith("web-leak")]
    rows = []
    for k, page in enumerate(rng.sample(long_pages, 3)):
        rows.append({"id": f"mirror-exact-{k}", "text": page["text"], "url": page["url"].replace("example.org",
                                                                                                 "mirror.example")})
    leak = next(w for w in web if w["id"] == "web-leak-0")
    for k, page in enumerate(rng.sample(long_pages, 2) + [leak]):
        words = page["text"].split(" ")
        words[rng.randrange(len(words))] = "indeed"
        rows.append({"id": f"mirror-edited-{k}", "text": " ".join(words), "url": page["url"] + "?ref=mirror"})
    for k, (lang, text) in enumerate(OTHER_LANGUAGE_PAGES):
        rows.append({"id": f"mirror-{lang}-{k}", "text": text, "url": f"https://example.{lang}/page/{k}"})
    rng.shuffle(rows)
    return write_jsonl(os.path.join(out_dir, "web_mirror.jsonl"), rows)


if __name__ == "__main__":
    print(generate())
