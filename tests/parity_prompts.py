"""Varied prompts (prose, code, Q&A, multilingual, lists) of 64+ tokens for parity tests."""

PROMPTS = [
    "The history of the Roman Empire spans more than a thousand years, from the founding of the city to the fall "
    "of Constantinople. During this time, emperors rose and fell, borders expanded and contracted, and the culture "
    "of the Mediterranean world was transformed by law, roads, and language. Historians still argue about",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, x):\n        self.items.append(x)\n\n    def pop(self):\n",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to synthesize foods "
    "from carbon dioxide and water. It generally involves the green pigment chlorophyll and generates oxygen as a "
    "byproduct. In the light-dependent reactions, energy from photons is captured and stored in the molecules",
    "Q: What is the capital of France?\nA: Paris.\nQ: What is the largest planet in the solar system?\nA: Jupiter.\n"
    "Q: Who wrote Romeo and Juliet?\nA: William Shakespeare.\nQ: What is the boiling point of water at sea level?\n"
    "A: 100 degrees Celsius.\nQ: How many continents are there?\nA:",
    "Shopping list for the weekend:\n- 2 kg of apples (green, not red!)\n- milk, 1.5 L\n- bread   (whole wheat)\n"
    "Les enfants jouaient dans le parc. Über den Wolken muss die Freiheit wohl grenzenlos sein. "
    "El rápido zorro marrón salta sobre el perro perezoso. Numbers: 3.14159, 2,718, 1e-9; emoji: 🙂🚀.",
]
