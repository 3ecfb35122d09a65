using System.Text;
using OrleansIdempotency.Silo.Storage;

namespace OrleansIdempotency.Silo.Tests;

[Collection(CpuHeavyCollection.Name)]
public sealed class RecordTableTests
{
    private const long Never = long.MaxValue;
    private const int Segment = RecordSegments.SegmentSize;

    private static byte[] Key(int i) => Encoding.UTF8.GetBytes($"key-{i}");

    // Each record's payload names its key and a generation, so a record read back under the wrong key is caught.
    private static byte[] Payload(int i, int generation, int length = 100)
    {
        var payload = new byte[length];
        Random.Shared.NextBytes(payload);
        BitConverter.TryWriteBytes(payload, i);
        BitConverter.TryWriteBytes(payload.AsSpan(sizeof(int)), generation);
        return payload;
    }

    private static long Add(RecordTable table, int i, byte[] payload, long expiresAt = Never, bool shortLived = false)
    {
        Assert.True(table.TryAdd(Key(i), payload, expiresAt, shortLived, out var version));
        return version;
    }

    private static void AssertHolds(RecordTable table, int i, byte[] payload, long version)
    {
        Assert.True(table.TryRead(Key(i), out var read, out var readVersion), $"key {i} is missing");
        Assert.Equal(payload, read);
        Assert.Equal(version, readVersion);
    }

    [Fact]
    public void HundredThousandRecords_AllReadBack_AcrossTheTablesGrowth()
    {
        var table = new RecordTable();
        var payloads = Enumerable.Range(0, 100_000).Select(i => Payload(i, 0, 50 + (i % 200))).ToArray();
        var versions = payloads.Select((payload, i) => Add(table, i, payload)).ToArray();

        Assert.Equal(100_000, table.Count);
        Assert.True(table.Capacity >= 100_000 * 10 / 7);
        for (var i = 0; i < payloads.Length; i++)
        {
            AssertHolds(table, i, payloads[i], versions[i]);
        }

        Assert.False(table.TryRead(Key(100_000), out _, out _));
    }

    [Fact]
    public void WriteThatCannotGetASegment_LeavesTheTableAsItWas()
    {
        // Near the process's memory limit a new segment may not be had: a slot changed before it was would point at
        // bytes released, which a later segment reuse hands to another key.
        var outOfMemory = false;
        var table = new RecordTable(key => key[^1] * 0x9E37_79B9_7F4A_7C15UL, size => outOfMemory ? throw new InsufficientMemoryException() : new byte[size]);
        var first = Payload(1, 0);
        var second = Payload(2, 0);
        var v1 = Add(table, 1, first, shortLived: true);
        var v2 = Add(table, 2, second, shortLived: true);
        var live = table.LiveBytes;
        var large = Payload(3, 0, Segment / 2);

        outOfMemory = true;
        Assert.Throws<InsufficientMemoryException>(() => table.TryReplace(Key(1), v1, large, Never, false, out _));
        Assert.Throws<InsufficientMemoryException>(() => table.TryAdd(Key(3), large, Never, false, out _));
        outOfMemory = false;

        Assert.Equal(live, table.LiveBytes);
        Assert.Equal(2, table.Count);
        Assert.False(table.Contains(Key(3)));
        AssertHolds(table, 1, first, v1);
        AssertHolds(table, 2, second, v2);
        Assert.True(table.TryReplace(Key(1), v1, large, Never, false, out var replaced));
        AssertHolds(table, 1, large, replaced);
        table.Purge(0);
        Assert.Equal(2, table.Count);
        table.Purge(long.MaxValue);
        Assert.Equal(0, table.Count);
        Assert.Equal(0, table.LiveBytes);
    }

    [Fact]
    public void KeysThatAllCollide_AreKeptApart_ThroughReplaceRemoveAndReAdd()
    {
        // One hash for every key: each lookup walks one probe sequence, past removed slots, comparing key bytes.
        var table = new RecordTable(_ => 42);
        var payloads = new Dictionary<int, (byte[] Payload, long Version)>();
        for (var i = 0; i < 300; i++)
        {
            var payload = Payload(i, 0);
            payloads[i] = (payload, Add(table, i, payload));
        }

        for (var i = 0; i < 300; i += 3)
        {
            Assert.True(table.TryRemove(Key(i), payloads[i].Version));
            payloads.Remove(i);
        }

        for (var i = 1; i < 300; i += 3)
        {
            var payload = Payload(i, 1);
            Assert.True(table.TryReplace(Key(i), payloads[i].Version, payload, Never, shortLived: false, out var version));
            payloads[i] = (payload, version);
        }

        for (var i = 0; i < 300; i += 6)
        {
            var payload = Payload(i, 2);
            payloads[i] = (payload, Add(table, i, payload));
        }

        Assert.Equal(payloads.Count, table.Count);
        for (var i = 0; i < 300; i++)
        {
            if (payloads.TryGetValue(i, out var expected))
            {
                AssertHolds(table, i, expected.Payload, expected.Version);
            }
            else
            {
                Assert.False(table.Contains(Key(i)));
            }
        }
    }

    [Fact]
    public void Versions_AreNeverReused_AcrossRemovalsAndPurges()
    {
        var table = new RecordTable();
        var seen = new HashSet<long>();
        for (var round = 0; round < 3; round++)
        {
            for (var i = 0; i < 1_000; i++)
            {
                var version = Add(table, i, Payload(i, round), expiresAt: round);
                Assert.True(seen.Add(version));
                Assert.True(table.TryReplace(Key(i), version, Payload(i, round), round, shortLived: false, out var replaced));
                Assert.True(seen.Add(replaced));
                Assert.False(table.TryRemove(Key(i), version));
            }

            table.Purge(nowUtcTicks: round);
            Assert.Equal(0, table.Count);
        }
    }

    [Fact]
    public void Purge_MovesTheFewLiveRecordsOutOfMostlyDeadSegments_KeepingTheirVersions()
    {
        var table = new RecordTable();
        var living = new Dictionary<int, (byte[] Payload, long Version)>();
        // Eight segments' worth of 1 KB records, one in ten of them still alive after the purge.
        for (var i = 0; i < 8 * Segment / 1_000; i++)
        {
            var payload = Payload(i, 0, 1_000);
            var version = Add(table, i, payload, expiresAt: i % 10 == 0 ? Never : 1);
            if (i % 10 == 0)
            {
                living[i] = (payload, version);
            }
        }

        Assert.True(table.SegmentBytes >= 8L * Segment);

        table.Purge(nowUtcTicks: 1);

        // A tenth of eight segments fits in the one being appended to when the purge began; the last segment let go is
        // kept for reuse.
        Assert.True(table.SegmentBytes <= 2L * Segment, $"{table.SegmentBytes} bytes of segments left");
        Assert.Equal(living.Count, table.Count);
        foreach (var (i, (payload, version)) in living)
        {
            AssertHolds(table, i, payload, version);
            Assert.True(table.TryReplace(Key(i), version, Payload(i, 1), Never, shortLived: false, out _));
        }
    }

    [Fact]
    public void ClaimsReplacedByTheirCompletions_LeaveNoSegmentsBehind()
    {
        var table = new RecordTable();
        const int Keys = 20_000;
        const int InFlight = 64;
        var claims = new long[Keys];
        long liveBytes = 0;
        // As under load: a key is claimed while the 64 claimed before it are still running, then completed.
        for (var i = 0; i < Keys + InFlight; i++)
        {
            if (i < Keys)
            {
                claims[i] = Add(table, i, Payload(i, 0, 150), shortLived: true);
            }

            var done = i - InFlight;
            if (done >= 0)
            {
                var completion = Payload(done, 1, 450);
                Assert.True(table.TryReplace(Key(done), claims[done], completion, Never, shortLived: false, out _));
                liveBytes += Key(done).Length + completion.Length;
            }
        }

        // The completions fill their segments; the claims' segments are let go once their last claim is replaced
        // (all but the one still being appended to, and one kept for reuse). Mixed in one stream, the dead claims
        // would take a fifth of each.
        var liveSegments = (liveBytes + Segment - 1) / Segment;
        Assert.True(table.SegmentBytes <= (liveSegments + 2) * Segment, $"{table.SegmentBytes} bytes of segments for {liveBytes} live bytes");
    }

    [Fact]
    public void SegmentsLetGo_AreReused_AndWhatTheyHoldReadsBackWhole()
    {
        var table = new RecordTable();
        const int Keys = 20_000;
        const int InFlight = 64;
        var claims = new long[Keys];
        var completions = new (byte[] Payload, long Version)[Keys];
        // As under load with nothing retained long: a key is claimed, completed 64 keys later, and its record
        // removed 64 keys after that (expired, say).
        for (var i = 0; i < Keys + (2 * InFlight); i++)
        {
            if (i < Keys)
            {
                claims[i] = Add(table, i, Payload(i, 0, 300), shortLived: true);
            }

            if (i - InFlight is var done and >= 0 and < Keys)
            {
                var completion = Payload(done, 1, 300);
                Assert.True(table.TryReplace(Key(done), claims[done], completion, Never, shortLived: false, out var version));
                completions[done] = (completion, version);
            }

            if (i - (2 * InFlight) is var gone and >= 0 and < Keys)
            {
                // Written into a reused segment or not, the record is the one written.
                AssertHolds(table, gone, completions[gone].Payload, completions[gone].Version);
                Assert.True(table.TryRemove(Key(gone), completions[gone].Version));
            }
        }

        // 40,000 records of about 310 bytes passed through: twelve segments' worth, of which about two live at any time.
        Assert.True(table.SegmentsAllocated <= 4, $"{table.SegmentsAllocated} segments allocated");
        Assert.Equal(0, table.Count);
    }

    [Fact]
    public void ARecordLargerThanAQuarterSegment_HasASegmentOfItsOwn_LetGoWhenReplaced()
    {
        var table = new RecordTable();
        var large = Payload(1, 0, 3 * Segment / 2);
        var version = Add(table, 1, large);
        Add(table, 2, Payload(2, 0));
        var withLarge = table.SegmentBytes;
        AssertHolds(table, 1, large, version);

        Assert.True(table.TryReplace(Key(1), version, Payload(1, 1), Never, shortLived: false, out _));

        Assert.Equal(withLarge - Key(1).Length - large.Length, table.SegmentBytes);
    }

    [Fact]
    public void Purge_ShrinksATableLeftMostlyEmpty_AndItStillWorks()
    {
        var table = new RecordTable();
        for (var i = 0; i < 50_000; i++)
        {
            Add(table, i, Payload(i, 0), expiresAt: i < 49_000 ? 1 : Never);
        }

        var grown = table.Capacity;
        table.Purge(nowUtcTicks: 1);

        Assert.Equal(1_000, table.Count);
        Assert.True(table.Capacity <= grown / 8, $"{table.Capacity} slots left of {grown}");
        Assert.True(table.Contains(Key(49_500)));
        Assert.False(table.Contains(Key(10)));
        var version = Add(table, 10, Payload(10, 1));
        Assert.True(table.TryRemove(Key(10), version));
    }

    [Fact]
    public async Task ParallelWritersAndPurges_LeaveEveryRecordAsItsLastWriteLeftIt()
    {
        var table = new RecordTable();
        const int Writers = 8;
        const int KeysEach = 10_000;
        long written = 0;
        using var done = new CancellationTokenSource();
        // Purges run throughout: dropping the expired records, moving records out of the segments they leave sparse.
        var purger = Task.Run(() =>
        {
            while (!done.IsCancellationRequested)
            {
                table.Purge(nowUtcTicks: 1);
            }
        });
        var expected = await Task.WhenAll(Enumerable.Range(0, Writers).Select(writer => Task.Run(() =>
        {
            var last = new Dictionary<int, byte[]?>();
            for (var n = 0; n < KeysEach; n++)
            {
                var i = (writer * KeysEach) + n;
                var claim = Add(table, i, Payload(i, 0, 150), shortLived: true);
                var completion = Payload(i, 1, 300 + (n % 500));
                Interlocked.Add(ref written, (2 * Key(i).Length) + 150 + completion.Length);
                // Every third completion expires at once: the purger drops it, and its neighbours' segments thin out.
                Assert.True(table.TryReplace(Key(i), claim, completion, n % 3 == 0 ? 1 : Never, shortLived: false, out var version));
                last[i] = n % 3 == 0 ? null : completion;
                if (n % 7 == 0 && n % 3 != 0)
                {
                    Assert.True(table.TryRemove(Key(i), version));
                    last[i] = null;
                }
            }

            return last;
        })));
        await done.CancelAsync();
        await purger;
        table.Purge(nowUtcTicks: 1);

        foreach (var (i, payload) in expected.SelectMany(last => last))
        {
            if (payload is null)
            {
                Assert.False(table.Contains(Key(i)), $"key {i} should be gone");
            }
            else
            {
                Assert.True(table.TryRead(Key(i), out var read, out _), $"key {i} is missing");
                Assert.Equal(payload, read);
            }
        }

        Assert.Equal(expected.Sum(last => last.Values.Count(payload => payload is not null)), table.Count);
        // Fewer segments were allocated than the bytes written fill: segments let go were written into again, by
        // these writers and moves at once, and the records above read back as written.
        Assert.True((long)table.SegmentsAllocated * Segment < written, $"{table.SegmentsAllocated} segments allocated for {written} bytes written");
    }
}
