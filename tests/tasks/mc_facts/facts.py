"""The questions of ``mc_facts``: the same 16 general-knowledge questions in five languages, written for this test.

Each row: the question in en, zh, fr, de and ja, then its four choices per language (the first is right; the loader
rotates the gold position so that it is not always first).
"""

QUESTIONS = [
    {
        "en": ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"]),
        "zh": ("法国的首都是哪里？", ["巴黎", "柏林", "马德里", "罗马"]),
        "fr": ("Quelle est la capitale de la France ?", ["Paris", "Berlin", "Madrid", "Rome"]),
        "de": ("Was ist die Hauptstadt von Frankreich?", ["Paris", "Berlin", "Madrid", "Rom"]),
        "ja": ("フランスの首都はどこですか？", ["パリ", "ベルリン", "マドリード", "ローマ"]),
    },
    {
        "en": ("How many days are there in a week?", ["seven", "five", "ten", "twelve"]),
        "zh": ("一个星期有几天？", ["七天", "五天", "十天", "十二天"]),
        "fr": ("Combien de jours y a-t-il dans une semaine ?", ["sept", "cinq", "dix", "douze"]),
        "de": ("Wie viele Tage hat eine Woche?", ["sieben", "fünf", "zehn", "zwölf"]),
        "ja": ("一週間は何日ですか？", ["七日", "五日", "十日", "十二日"]),
    },
    {
        "en": ("What colour is the sky on a clear day?", ["blue", "green", "red", "black"]),
        "zh": ("晴天时天空是什么颜色？", ["蓝色", "绿色", "红色", "黑色"]),
        "fr": ("De quelle couleur est le ciel par beau temps ?", ["bleu", "vert", "rouge", "noir"]),
        "de": ("Welche Farbe hat der Himmel an einem klaren Tag?", ["blau", "grün", "rot", "schwarz"]),
        "ja": ("晴れた日の空は何色ですか？", ["青", "緑", "赤", "黒"]),
    },
    {
        "en": ("Which animal says meow?", ["the cat", "the dog", "the cow", "the horse"]),
        "zh": ("哪种动物会喵喵叫？", ["猫", "狗", "牛", "马"]),
        "fr": ("Quel animal fait miaou ?", ["le chat", "le chien", "la vache", "le cheval"]),
        "de": ("Welches Tier macht miau?", ["die Katze", "der Hund", "die Kuh", "das Pferd"]),
        "ja": ("ニャーと鳴く動物はどれですか？", ["猫", "犬", "牛", "馬"]),
    },
    {
        "en": ("What is two plus three?", ["five", "four", "six", "seven"]),
        "zh": ("二加三等于几？", ["五", "四", "六", "七"]),
        "fr": ("Combien font deux plus trois ?", ["cinq", "quatre", "six", "sept"]),
        "de": ("Was ist zwei plus drei?", ["fünf", "vier", "sechs", "sieben"]),
        "ja": ("二足す三はいくつですか？", ["五", "四", "六", "七"]),
    },
    {
        "en": ("At how many degrees Celsius does water freeze?", ["0", "50", "100", "37"]),
        "zh": ("水在摄氏多少度结冰？", ["0", "50", "100", "37"]),
        "fr": ("À combien de degrés Celsius l'eau gèle-t-elle ?", ["0", "50", "100", "37"]),
        "de": ("Bei wie viel Grad Celsius gefriert Wasser?", ["0", "50", "100", "37"]),
        "ja": ("水は摂氏何度で凍りますか？", ["0", "50", "100", "37"]),
    },
    {
        "en": ("Which planet do we live on?", ["Earth", "Mars", "Jupiter", "Venus"]),
        "zh": ("我们生活在哪个星球上？", ["地球", "火星", "木星", "金星"]),
        "fr": ("Sur quelle planète vivons-nous ?", ["la Terre", "Mars", "Jupiter", "Vénus"]),
        "de": ("Auf welchem Planeten leben wir?", ["der Erde", "dem Mars", "dem Jupiter", "der Venus"]),
        "ja": ("私たちはどの惑星に住んでいますか？", ["地球", "火星", "木星", "金星"]),
    },
    {
        "en": ("What is the largest ocean on Earth?", ["the Pacific", "the Atlantic", "the Indian", "the Arctic"]),
        "zh": ("地球上最大的海洋是哪个？", ["太平洋", "大西洋", "印度洋", "北冰洋"]),
        "fr": (
            "Quel est le plus grand océan du monde ?",
            ["le Pacifique", "l'Atlantique", "l'océan Indien", "l'Arctique"],
        ),
        "de": (
            "Welcher ist der größte Ozean der Erde?",
            ["der Pazifik", "der Atlantik", "der Indische Ozean", "das Nordpolarmeer"],
        ),
        "ja": ("地球で一番大きい海はどれですか？", ["太平洋", "大西洋", "インド洋", "北極海"]),
    },
    {
        "en": ("What is the capital of Japan?", ["Tokyo", "Osaka", "Kyoto", "Beijing"]),
        "zh": ("日本的首都是哪里？", ["东京", "大阪", "京都", "北京"]),
        "fr": ("Quelle est la capitale du Japon ?", ["Tokyo", "Osaka", "Kyoto", "Pékin"]),
        "de": ("Was ist die Hauptstadt von Japan?", ["Tokio", "Osaka", "Kyoto", "Peking"]),
        "ja": ("日本の首都はどこですか？", ["東京", "大阪", "京都", "北京"]),
    },
    {
        "en": ("How many legs does a spider have?", ["eight", "six", "four", "ten"]),
        "zh": ("蜘蛛有几条腿？", ["八条", "六条", "四条", "十条"]),
        "fr": ("Combien de pattes a une araignée ?", ["huit", "six", "quatre", "dix"]),
        "de": ("Wie viele Beine hat eine Spinne?", ["acht", "sechs", "vier", "zehn"]),
        "ja": ("クモの脚は何本ですか？", ["八本", "六本", "四本", "十本"]),
    },
    {
        "en": ("Who wrote Romeo and Juliet?", ["Shakespeare", "Dickens", "Tolstoy", "Goethe"]),
        "zh": ("《罗密欧与朱丽叶》的作者是谁？", ["莎士比亚", "狄更斯", "托尔斯泰", "歌德"]),
        "fr": ("Qui a écrit Roméo et Juliette ?", ["Shakespeare", "Dickens", "Tolstoï", "Goethe"]),
        "de": ("Wer schrieb Romeo und Julia?", ["Shakespeare", "Dickens", "Tolstoi", "Goethe"]),
        "ja": (
            "『ロミオとジュリエット』を書いたのは誰ですか？",
            ["シェイクスピア", "ディケンズ", "トルストイ", "ゲーテ"],
        ),
    },
    {
        "en": ("What is the capital of Germany?", ["Berlin", "Munich", "Vienna", "Paris"]),
        "zh": ("德国的首都是哪里？", ["柏林", "慕尼黑", "维也纳", "巴黎"]),
        "fr": ("Quelle est la capitale de l'Allemagne ?", ["Berlin", "Munich", "Vienne", "Paris"]),
        "de": ("Was ist die Hauptstadt von Deutschland?", ["Berlin", "München", "Wien", "Paris"]),
        "ja": ("ドイツの首都はどこですか？", ["ベルリン", "ミュンヘン", "ウィーン", "パリ"]),
    },
    {
        "en": ("Which gas do plants take in from the air?", ["carbon dioxide", "helium", "neon", "hydrogen"]),
        "zh": ("植物从空气中吸收哪种气体？", ["二氧化碳", "氦气", "氖气", "氢气"]),
        "fr": (
            "Quel gaz les plantes absorbent-elles dans l'air ?",
            ["le dioxyde de carbone", "l'hélium", "le néon", "l'hydrogène"],
        ),
        "de": ("Welches Gas nehmen Pflanzen aus der Luft auf?", ["Kohlendioxid", "Helium", "Neon", "Wasserstoff"]),
        "ja": ("植物は空気中からどの気体を取り込みますか？", ["二酸化炭素", "ヘリウム", "ネオン", "水素"]),
    },
    {
        "en": ("In which direction does the sun rise?", ["east", "west", "north", "south"]),
        "zh": ("太阳从哪个方向升起？", ["东方", "西方", "北方", "南方"]),
        "fr": ("De quel côté le soleil se lève-t-il ?", ["à l'est", "à l'ouest", "au nord", "au sud"]),
        "de": ("In welcher Himmelsrichtung geht die Sonne auf?", ["im Osten", "im Westen", "im Norden", "im Süden"]),
        "ja": ("太陽はどの方角から昇りますか？", ["東", "西", "北", "南"]),
    },
    {
        "en": ("What is the capital of Italy?", ["Rome", "Milan", "Athens", "Madrid"]),
        "zh": ("意大利的首都是哪里？", ["罗马", "米兰", "雅典", "马德里"]),
        "fr": ("Quelle est la capitale de l'Italie ?", ["Rome", "Milan", "Athènes", "Madrid"]),
        "de": ("Was ist die Hauptstadt von Italien?", ["Rom", "Mailand", "Athen", "Madrid"]),
        "ja": ("イタリアの首都はどこですか？", ["ローマ", "ミラノ", "アテネ", "マドリード"]),
    },
    {
        "en": ("Which is the largest animal?", ["the blue whale", "the elephant", "the giraffe", "the lion"]),
        "zh": ("最大的动物是什么？", ["蓝鲸", "大象", "长颈鹿", "狮子"]),
        "fr": ("Quel est le plus grand animal ?", ["la baleine bleue", "l'éléphant", "la girafe", "le lion"]),
        "de": ("Welches ist das größte Tier?", ["der Blauwal", "der Elefant", "die Giraffe", "der Löwe"]),
        "ja": ("一番大きい動物は何ですか？", ["シロナガスクジラ", "ゾウ", "キリン", "ライオン"]),
    },
]
