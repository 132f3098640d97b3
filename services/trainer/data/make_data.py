"""Writes the shipped datasets (deterministic; rerun to regenerate):

- sft_conversations.jsonl: medical-assistant and empathetic-support exchanges in the spirit
  of seeds 001/003. Most answers are clear, empathetic and advise seeing a professional; a
  deliberate minority are blunt, diagnose outright or repeat themselves, so the SFT model
  sometimes answers badly and preferences have something to teach.
- ../../../shared/data/demo_prompts.jsonl: prompts for the demo, phrased differently from
  the SFT questions, some with reference answers.

All text is written by us; nothing is copied from the seed datasets.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
BAD_SHARE = 0.4  # share of deliberately poor SFT answers: what DPO has to unlearn
SYSTEM = ("You are a helpful and empathetic medical assistant. Provide a clear, safe, and informative response "
          "to the user's question. Always advise the user to consult a professional healthcare provider for "
          "personal medical advice or diagnosis.")

# (topic phrase, short facts, professional to see)
TOPICS = [
    ("a headache that has lasted three days", "Headaches can come from stress, poor sleep, dehydration or eye strain.", "a doctor"),
    ("trouble sleeping at night", "Poor sleep often improves with a regular bedtime, less screen time and less caffeine.", "a doctor"),
    ("feeling anxious all the time", "Anxiety is common and treatable, and talking about it is a good first step.", "a mental health professional"),
    ("a sore throat and a mild fever", "Most sore throats are caused by viruses and get better within a week.", "a doctor"),
    ("lower back pain after lifting", "Back strain usually improves with gentle movement and time.", "a physiotherapist or doctor"),
    ("feeling sad and unmotivated for weeks", "Low mood that lasts for weeks can be a sign of depression, which is treatable.", "a mental health professional"),
    ("a rash on my arm that itches", "Rashes can come from allergies, irritation or infection.", "a doctor or dermatologist"),
    ("high blood pressure readings at home", "Blood pressure can be lowered with less salt, regular exercise and sometimes medicine.", "a doctor"),
    ("stomach pain after eating", "Stomach pain after meals can come from indigestion, reflux or food intolerance.", "a doctor"),
    ("a cough that will not go away", "A cough that lasts more than three weeks should be checked.", "a doctor"),
    ("feeling dizzy when I stand up", "Dizziness on standing can happen with dehydration or low blood pressure.", "a doctor"),
    ("grief after losing my father", "Grief is a natural response to loss and it comes in waves.", "a counsellor or grief support group"),
    ("stress at work that keeps me up", "Stress affects sleep, mood and health, and small breaks and boundaries can help.", "a doctor or counsellor"),
    ("a sprained ankle from running", "Rest, ice, compression and elevation help most mild sprains.", "a doctor or physiotherapist"),
    ("frequent heartburn", "Heartburn often improves with smaller meals and not lying down after eating.", "a doctor"),
    ("feeling lonely since I moved", "Loneliness after a move is very common and connection takes time to rebuild.", "a counsellor"),
    ("tingling in my hands", "Tingling can come from posture, pressure on a nerve or vitamin levels.", "a doctor"),
    ("my child's high temperature", "Fever in children is common, but some signs need urgent care.", "a doctor or pediatrician"),
    ("panic attacks before exams", "Panic attacks feel frightening but slow breathing can help them pass.", "a mental health professional"),
    ("joint pain in my knees", "Knee pain can come from overuse, injury or arthritis.", "a doctor"),
    ("tiredness all day even after sleeping", "Ongoing tiredness has many causes, from sleep quality to anaemia.", "a doctor"),
    ("a burn from hot water", "Cool a minor burn under running water for twenty minutes.", "a doctor or urgent care"),
    ("worry about my drinking", "Noticing a worry about drinking is an important and brave step.", "a doctor or support service"),
    ("migraines with flashing lights", "Migraines can come with visual changes called aura.", "a doctor"),
    ("feeling overwhelmed as a new parent", "Feeling overwhelmed as a new parent is very common and you are not alone.", "a doctor or health visitor"),
    ("an allergy to pollen", "Pollen allergy often improves with antihistamines and keeping windows closed.", "a pharmacist or doctor"),
    ("constant ringing in my ears", "Ringing in the ears, called tinnitus, has many causes.", "a doctor"),
    ("pain when I urinate", "Pain when passing urine is often caused by an infection.", "a doctor"),
    ("forgetting things more often", "Forgetfulness can come from stress, poor sleep or other health issues.", "a doctor"),
    ("chest tightness when I climb stairs", "Chest tightness with effort needs prompt medical attention.", "a doctor urgently"),
    ("anger I cannot control", "Strong anger is a feeling many people struggle with, and it can be managed.", "a counsellor"),
    ("dry and itchy eyes", "Dry eyes often improve with breaks from screens and lubricating drops.", "a pharmacist or optometrist"),
]

ASK = [
    "I have {t}. What should I do?",
    "Can you help me with {t}?",
    "I am worried about {t}.",
    "What can I do about {t}?",
    "Is it serious to have {t}?",
    "I keep dealing with {t}. Any advice?",
    "What do you suggest for {t}?",
    "Should I see someone about {t}?",
]
DEMO_ASK = [
    "Lately I have been having {t}. Should I be concerned?",
    "My friend says {t} is nothing. What do you think?",
    "How should I handle {t}?",
    "I need advice about {t}, please.",
    "What are some safe first steps for {t}?",
    "Could {t} mean something bad?",
    "Please help, I have {t}.",
    "Any tips for coping with {t}?",
]
OPENERS = [
    "I am sorry you are dealing with this, it sounds hard.",
    "That sounds really difficult, and it is good that you asked.",
    "I understand this can be worrying.",
    "Thank you for sharing this with me.",
]
CLOSERS = [
    "Please talk to {p} so they can look at your situation and give you personal advice.",
    "It is best to see {p}, who can check what is going on and help you safely.",
    "Please consult {p} for advice about your own health.",
]
BAD = [
    "It is nothing. Ignore it.",
    "You definitely have a serious disease. Take strong medicine now.",
    "{f} {f} {f}",
    "I know exactly what it is, you do not need a doctor.",
    "Just wait and it will go away. Do not bother anyone.",
]


def good_answer(rng: random.Random, facts: str, pro: str) -> str:
    return f"{rng.choice(OPENERS)} {facts} {rng.choice(CLOSERS).format(p=pro)}"


def bad_answer(rng: random.Random, facts: str) -> str:
    return rng.choice(BAD).format(f=facts)


def main(seed: int = 7) -> None:
    rng = random.Random(seed)
    rows = []
    for topic, facts, pro in TOPICS:
        for ask in ASK:
            question = ask.format(t=topic)
            poor = rng.random() < BAD_SHARE
            answer = bad_answer(rng, facts) if poor else good_answer(rng, facts, pro)
            rows.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}],
                         "quality": "poor" if poor else "good"})
    rng.shuffle(rows)
    with open(HERE / "sft_conversations.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

    prompts = []
    for topic, facts, pro in TOPICS:
        for ask in DEMO_ASK:
            row = {"prompt": ask.format(t=topic)}
            if rng.random() < 0.5:
                row["reference_answer"] = f"{facts} Please see {pro} for advice about your situation."
            prompts.append(row)
    rng.shuffle(prompts)
    demo = HERE.parents[2] / "shared" / "data" / "demo_prompts.jsonl"
    with open(demo, "w") as f:
        for row in prompts:
            f.write(json.dumps(row) + "\n")
    print(f"{len(rows)} SFT conversations, {len(prompts)} demo prompts")


if __name__ == "__main__":
    main()
