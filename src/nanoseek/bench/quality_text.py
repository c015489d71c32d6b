"""The fixed text `nanoseek bench quality` scores (teacher forcing): English prose written for this benchmark
(no copyright beyond the project's license), about 1,900 words, over 2,000 tokens in SmolLM2's and Gemma 3's
tokenizers. It is fixed so that every run, of every side, scores the same tokens; edit it and every recorded
quality figure is void (the report prints the text's SHA-256 prefix)."""

TEXT = """\
The river that runs through the old market town is neither wide nor deep, but for most of its history it decided
where people lived, what they ate and how they earned their money. In the spring it rises with the melting snow
from the hills to the north, and in a wet year it spills over the low meadows on the eastern bank. The farmers who
first settled there learned to build their houses on the higher ground to the west and to use the meadows for hay,
which could be cut in the summer after the water had gone down. A stone bridge was built in the fourteenth century,
and the town grew around the road that crossed it. For several hundred years almost every cart that carried wool,
grain or timber from the hill farms to the coast passed over that bridge, and the town charged a small toll for
each one.

The toll house still stands at the western end of the bridge. It is a narrow building of grey stone with a single
window facing the road, so that the keeper could see travellers coming from either direction. The accounts kept
by the keepers survive for most of the eighteenth century, and they are remarkably detailed. They record not only
the number of carts and animals that crossed each day but also the weather, the state of the river and, now and
then, a short remark about a quarrel or an accident. One keeper noted that a flock of two hundred sheep had taken
the whole of a morning to cross because the animals refused to walk past a barking dog. Another complained that
the mayor had crossed twice without paying, claiming that the toll did not apply to members of the council.

Trade changed the town slowly and then very quickly. When a canal was dug along the valley at the end of the
eighteenth century, heavy goods began to travel by water instead of by road, and the number of carts on the bridge
fell by half within a decade. The canal brought coal from the mines to the south, and with cheap coal came the
first mills. They were built along the river, where a weir could be made to drive a water wheel, and later they
were fitted with steam engines. For two generations the mills employed more people than the farms. Whole families
worked there, and children as young as eight were sent to tend the spinning machines until new laws raised the age
and shortened the hours. The rows of small brick houses that still line the streets behind the market square were
built for the mill workers in those years.

The railway arrived in the middle of the nineteenth century and changed the town again. The line followed the
canal for most of the way, and within twenty years the canal company could no longer pay its debts. Its barges
were sold, its locks fell into disrepair, and stretches of the water were filled in to make room for sidings and
warehouses. The railway made it possible to bring in goods from far away, and the shops in the market square began
to sell tea, sugar and printed cotton at prices that ordinary families could afford. It also allowed people to
leave. Many of the young men and women who had grown up in the mill houses took the train to the large cities,
where wages were higher, and the population of the town, which had doubled in fifty years, began to fall.

In the twentieth century the mills closed one by one. Some were turned into warehouses, others were pulled down,
and one was left empty for so long that trees grew through its roof. The town became a quiet place, known mainly
for its Saturday market and for the annual fair held in the meadows in late summer, when the river was at its
lowest. Visitors who came for the fair often remarked that the town seemed to belong to an earlier age. The bridge
was too narrow for modern lorries, so a new road was built to the south, and the old bridge was closed to traffic.
For the first time in six hundred years, the centre of the town was silent at night.

It was during those quiet decades that a group of residents began to collect the town's history. They started with
the toll keepers' accounts, which had been stored in the basement of the town hall and were slowly being ruined by
damp. The volunteers dried the pages, copied them by hand and later photographed them. They went on to record the
memories of older people who had worked in the last of the mills, and they asked families to lend them letters,
photographs and account books. Over twenty years they built up an archive that filled three rooms of the old toll
house, which the council had given them for a nominal rent. Students from the university in the nearest city came
to use it, and several books about the economic history of the valley were based on its documents.

The archive showed how closely the life of the town had followed the river. In years when the spring flood was
high, the meadows produced more hay, the farmers kept more animals through the winter, and the market was busier
the following year. In dry years the mills had to stop for weeks because there was not enough water to drive the
wheels, and the account books of the shops show that families bought less bread and more potatoes during those
weeks. The volunteers found a letter written by a mill owner to his brother in which he explained that he had
installed a steam engine not because it was cheaper than water, which it was not, but because he could no longer
afford to stop work whenever the weather was dry. Steam made the mills independent of the river, and in doing so
it made them independent of the town's ancient rhythm.

Today the river is cleaner than it has been for two centuries. The weirs that once fed the mills have been fitted
with passes so that fish can swim upstream, and otters have returned to the quiet stretches below the bridge. The
meadows on the eastern bank are protected, and in early summer they are full of wild flowers. A path has been laid
along the line of the old canal, and on weekends it is busy with walkers and cyclists. Some of the mill buildings
have been turned into flats, and one houses a small museum where visitors can see a working loom and read the toll
keepers' accounts in a facsimile edition.

Historians who study small towns like this one often say that the most important changes are the ones nobody
noticed at the time. The people who dug the canal did not know that they were preparing the way for the mills, and
the engineers who built the railway did not imagine that it would empty the mill houses within a lifetime. Each
generation dealt with the problems in front of it: a flood that ruined the hay, a price that fell, a law that
changed the hours of work. Only when the records of many years are laid side by side does the larger pattern
appear, and even then it is easy to read into it a purpose that no one at the time would have recognised.

A good archive makes that kind of reading possible, but it also guards against its dangers. The toll keepers did
not write for historians. They wrote to keep track of money and to protect themselves against accusations of
theft, and their remarks about the weather and the quarrels on the bridge were written for their own amusement
or for the next keeper. Because they had no reason to exaggerate, their figures are trustworthy in a way that the
speeches of mayors and the advertisements of mill owners are not. When the number of carts falls by half in ten
years, the fall is real, whatever explanation one gives for it. The volunteers who rescued the accounts from the
damp basement understood this. They insisted on copying every page, including the dull ones, because they could
not know which details a later reader would need.

The same lesson applies far beyond local history. Anyone who measures something over a long period, whether it is
the level of a river, the price of bread or the speed of a machine, faces the temptation to keep only the figures
that fit the story they expect to tell. The careful measurer keeps everything, writes down how each figure was
obtained and under what conditions, and leaves the interpretation for later. A figure without its method is
little better than a rumour, because no one can check it or repeat it. A figure with its method can be tested,
corrected and built upon, even by people who disagree with the conclusions first drawn from it.

The volunteers' archive is now looked after by the county record office, which has moved the original documents
to a building with controlled temperature and humidity. The copies remain in the toll house, where anyone may
read them. On the wall of the reading room hangs a framed page from one of the earliest account books. It records
a single day in March, when the river was in flood and the bridge was closed for the afternoon. The keeper wrote
that no carts had crossed, that the water had reached the third arch, and that he had spent the hours mending his
boots. At the bottom of the page, in a different hand, someone has added a line: the water went down in the
night, and trade was brisk in the morning. Nobody knows who wrote it, but it is the line that visitors remember.

In the end, the town's story is not a story of decline. It is a story of a place that has been many things in
turn: a crossing, a market, a mill town and now something harder to name, a place where people live because they
like the river and the hills, and where the past is close enough to read. The bridge still carries walkers across
the water, the market still opens on Saturday, and in late summer the fair still fills the meadows. The river
rises every spring and falls every summer, as it did before anyone built a bridge, and as it will long after the
last of the mill chimneys has gone.
"""
