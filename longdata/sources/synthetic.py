"""Deterministic pseudo-natural filler text in English and Chinese.

Nothing can be downloaded in the build environment, so every offline sample, the anti-haystack
filler and the quickstart tokenizer's training corpus come from here. The text only has to look
like prose to a tokenizer and a packer: grammatical-ish sentences of varied length, grouped into
paragraphs, with a vocabulary large enough that BPE learns real-looking subwords.

All randomness flows through the ``random.Random`` passed in, so a seed fixes the output exactly.
``MARKER_*`` words never occur in filler text: callers plant them to make phrases that are
guaranteed to be unique inside a generated document.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Literal

Lang = Literal["en", "zh"]
LANGS: tuple[Lang, ...] = ("en", "zh")


def _words(text: str) -> tuple[str, ...]:
    """Whitespace-separated words of ``text``, duplicates dropped, order kept."""
    return tuple(dict.fromkeys(text.split()))


EN_NOUNS = _words(
    """
    river city village market garden forest mountain valley harbour bridge road station library
    school teacher student farmer doctor engineer artist writer merchant sailor soldier child
    family friend neighbour council government company factory office machine engine wheel
    window door wall roof kitchen table chair letter book story song picture map journey season
    winter summer spring autumn morning evening night weather rain wind storm cloud sun moon star
    ocean island coast field meadow orchard harvest grain bread water fire stone iron wood glass
    paper cloth wool silk salt sugar coffee tea fruit apple river lamp candle clock bell tower
    castle temple church museum theatre festival holiday language history science theory method
    experiment result question answer problem solution reason idea plan decision agreement
    argument report record archive survey sample measure distance weight price cost value market
    trade industry economy policy law court judge witness crowd audience leader member group
    committee project system network signal message voice memory dream hope fear courage patience
    habit tradition custom ritual ceremony journey path trail track border province region
    """
)
EN_VERBS = _words(
    """
    builds carries changes describes discovers explains follows gathers guides holds improves
    joins keeps leads measures moves notices opens organises prepares protects questions reaches
    receives records reduces remembers repairs replaces reports shapes shows studies supports
    teaches tests tracks trades visits watches welcomes writes crosses finds forgets answers
    collects compares considers defends delivers designs develops divides examines expects
    imagines includes invites lifts loses manages mentions offers paints plants prefers produces
    promises reads recalls returns reveals selects serves shares signs sorts steers suggests
    surrounds touches translates understands uses values weighs
    """
)
EN_ADJECTIVES = _words(
    """
    old new small large quiet busy bright dark warm cold early late quick slow careful gentle
    honest simple strange familiar distant nearby narrow wide heavy light rich poor modern ancient
    local foreign public private common rare useful patient curious steady sudden careful clear
    open hidden empty crowded wooden stone northern southern eastern western green blue grey
    golden silver white black red yellow brown tall short young wise calm noisy humble proud
    famous ordinary serious cheerful tired hungry generous formal informal regular seasonal
    practical detailed broad shallow deep fresh dry wet sharp soft rough smooth
    """
)
EN_ADVERBS = _words(
    """
    slowly quickly carefully quietly often rarely usually sometimes always nearly suddenly
    gradually finally eventually easily gently openly briefly warmly clearly
    """
)
EN_PREPOSITIONS = _words("near beside behind across through along under above around beyond")
EN_DETERMINERS = ("the", "the", "the", "some", "every", "each", "that", "this", "one", "another")
EN_CONNECTIVES = (
    "and",
    "but",
    "because",
    "although",
    "while",
    "so",
    "since",
    "until",
    "after",
    "before",
    "whereas",
    "even though",
    "as soon as",
)
EN_OPENERS = (
    "However",
    "Meanwhile",
    "Later",
    "In the end",
    "For a while",
    "At first",
    "Even so",
    "In many places",
    "By contrast",
    "As a result",
    "Every year",
    "Not long after",
)

# Characters are kept apart by word so that sentences look like real segmented Chinese prose.
ZH_SUBJECTS = _words(
    """
    我们 他们 老师 学生 农民 医生 工程师 作家 商人 孩子 家人 朋友 邻居 村民 城市 政府 公司
    工厂 委员会 研究人员 记者 年轻人 老人 游客 工人 妈妈 爸爸 大家 这个地方 那座小镇 河边的人
    """
)
ZH_ADVERBS = _words("经常 总是 慢慢地 认真地 已经 终于 常常 一直 仍然 突然 渐渐 悄悄地 再次 首先")
ZH_VERBS = _words(
    """
    建设 发展 讨论 研究 学习 整理 观察 记录 介绍 说明 改变 保护 准备 完成 参加 组织 提出
    解决 比较 选择 支持 发现 回忆 描述 修理 种植 收集 交换 检查 打开 安排 分享 理解 接受
    """
)
ZH_ADJECTIVES = _words(
    """
    古老的 新的 安静的 热闹的 明亮的 温暖的 寒冷的 细心的 简单的 重要的 遥远的 附近的 宽阔的
    狭窄的 丰富的 普通的 美丽的 干净的 年轻的 传统的 崭新的 复杂的 有趣的 漫长的 短暂的 清楚的
    """
)
ZH_NOUNS = _words(
    """
    河流 城市 村庄 市场 花园 森林 山谷 港口 桥梁 道路 车站 图书馆 学校 工厂 办公室 机器 窗户
    厨房 桌子 书信 故事 歌曲 地图 旅程 季节 冬天 夏天 春天 秋天 早晨 晚上 天气 雨水 风景 月亮
    海洋 岛屿 田野 果园 粮食 面包 茶叶 水果 灯光 钟声 城墙 节日 语言 历史 科学 方法 实验 结果
    问题 答案 计划 决定 报告 记录 档案 价格 经济 政策 法律 社会 文化 教育 环境 技术 资源 传统
    习惯 经验 意见 变化 情况 过程 关系 条件 作用 特点 内容 活动 生活 工作 时间 空间 声音 记忆
    """
)
ZH_CONNECTIVES = _words("但是 因为 所以 而且 虽然 然后 同时 于是 不过 因此 如果 只是")
ZH_OPENERS = _words("后来 当时 最近 那一年 每到秋天 在很多地方 与此同时 从那以后 总的来说 一开始")

# Never used by the filler generator (checked in tests), so a phrase built from them cannot occur
# in filler by accident. Chinese markers avoid every character of the filler vocabulary.
MARKER_ADJECTIVES_EN = _words(
    """
    amber crimson violet scarlet copper emerald ivory cobalt saffron indigo turquoise obsidian
    velvet marble crystal lunar solar arctic tropical wandering silent whispering sleeping hollow
    """
)
MARKER_NOUNS_EN = _words(
    """
    lantern falcon compass violin kettle anchor feather lighthouse telescope walrus pelican
    hourglass mandolin saddle lobster chimney tortoise dragonfly porcupine carousel harpsichord
    """
)
MARKER_ADJECTIVES_ZH = _words("琥珀色 紫罗兰 翡翠 象牙 珊瑚 琉璃 绯红 靛蓝 银灰 玫瑰")
MARKER_NOUNS_ZH = _words("鹦鹉 猎鹰 罗盘 琵琶 铜壶 船锚 羽毛 麒麟 沙漏 乌龟 蜻蜓 豪猪 旋转木马")


def _en_noun_phrase(rng: random.Random) -> str:
    words = [rng.choice(EN_DETERMINERS)]
    if rng.random() < 0.5:
        words.append(rng.choice(EN_ADJECTIVES))
    words.append(rng.choice(EN_NOUNS))
    if rng.random() < 0.2:
        words += [rng.choice(EN_PREPOSITIONS), "the", rng.choice(EN_NOUNS)]
    return " ".join(words)


def _en_clause(rng: random.Random) -> str:
    parts = [_en_noun_phrase(rng)]
    if rng.random() < 0.25:
        parts.append(rng.choice(EN_ADVERBS))
    parts += [rng.choice(EN_VERBS), _en_noun_phrase(rng)]
    return " ".join(parts)


def en_sentence(rng: random.Random) -> str:
    clauses = [_en_clause(rng)]
    # Mostly one or two clauses, occasionally a long run-on: varied lengths matter for packing.
    while rng.random() < 0.4 and len(clauses) < 4:
        clauses.append(rng.choice(EN_CONNECTIVES) + " " + _en_clause(rng))
    text = ", ".join(clauses)
    if rng.random() < 0.15:
        text = rng.choice(EN_OPENERS) + ", " + text
    return text[0].upper() + text[1:] + ("?" if rng.random() < 0.03 else ".")


def _zh_clause(rng: random.Random) -> str:
    parts = [rng.choice(ZH_SUBJECTS)]
    if rng.random() < 0.4:
        parts.append(rng.choice(ZH_ADVERBS))
    parts.append(rng.choice(ZH_VERBS))
    if rng.random() < 0.5:
        parts.append(rng.choice(ZH_ADJECTIVES))
    parts.append(rng.choice(ZH_NOUNS))
    return "".join(parts)


def zh_sentence(rng: random.Random) -> str:
    clauses = [_zh_clause(rng)]
    while rng.random() < 0.45 and len(clauses) < 4:
        clauses.append(rng.choice(ZH_CONNECTIVES) + _zh_clause(rng))
    text = "，".join(clauses)
    if rng.random() < 0.15:
        text = rng.choice(ZH_OPENERS) + "，" + text
    return text + ("？" if rng.random() < 0.03 else "。")


def sentence(rng: random.Random, lang: Lang) -> str:
    return en_sentence(rng) if lang == "en" else zh_sentence(rng)


def sentence_separator(lang: Lang) -> str:
    """What goes between two sentences of a paragraph: a space in English, nothing in Chinese."""
    return " " if lang == "en" else ""


def paragraph_sentences(rng: random.Random, lang: Lang) -> list[str]:
    return [sentence(rng, lang) for _ in range(rng.randint(2, 9))]


def paragraph(rng: random.Random, lang: Lang) -> str:
    return sentence_separator(lang).join(paragraph_sentences(rng, lang))


def paragraphs(rng: random.Random, lang: Lang) -> Iterator[str]:
    """An endless stream of paragraphs."""
    while True:
        yield paragraph(rng, lang)


def document(rng: random.Random, lang: Lang, n_chars: int) -> list[str]:
    """Paragraphs whose ``"\\n\\n"``-joined length is at least ``n_chars`` (one paragraph more)."""
    out: list[str] = []
    total = 0
    for para in paragraphs(rng, lang):
        if total >= n_chars:
            break
        out.append(para)
        total += len(para) + 2
    return out


def topic_title(rng: random.Random, lang: Lang) -> str:
    if lang == "en":
        adjective, first = rng.choice(EN_ADJECTIVES), rng.choice(EN_NOUNS)
        return f"{adjective.title()} {first.title()} and the {rng.choice(EN_NOUNS).title()}"
    return f"{rng.choice(ZH_ADJECTIVES)}{rng.choice(ZH_NOUNS)}与{rng.choice(ZH_NOUNS)}"


def marker_phrase(rng: random.Random, lang: Lang) -> str:
    """An adjective-noun pair that never occurs in filler text, e.g. ``amber lantern``."""
    if lang == "en":
        return f"{rng.choice(MARKER_ADJECTIVES_EN)} {rng.choice(MARKER_NOUNS_EN)}"
    return f"{rng.choice(MARKER_ADJECTIVES_ZH)}{rng.choice(MARKER_NOUNS_ZH)}"


def marker_phrase_count(lang: Lang) -> int:
    """How many phrases `marker_phrase` can write (every pair is its own phrase)."""
    if lang == "en":
        return len(MARKER_ADJECTIVES_EN) * len(MARKER_NOUNS_EN)
    return len(MARKER_ADJECTIVES_ZH) * len(MARKER_NOUNS_ZH)
