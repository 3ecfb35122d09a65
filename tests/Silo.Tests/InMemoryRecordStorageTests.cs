using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Testing;
using Microsoft.Extensions.Time.Testing;
using Orleans.Storage;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Silo.Storage;

namespace OrleansIdempotency.Silo.Tests;

[Collection(CpuHeavyCollection.Name)]
public sealed class InMemoryRecordStorageTests : IDisposable
{
    private const string State = IdempotencyGrain.StateName;

    private readonly FakeTimeProvider time = new(new DateTimeOffset(2026, 1, 1, 0, 0, 0, TimeSpan.Zero));
    private readonly InMemoryRecordStorage storage;

    public InMemoryRecordStorageTests() => storage = new InMemoryRecordStorage(TestSerializer.Storage, time);

    public void Dispose() => storage.Dispose();

    private static GrainId Key() => GrainId.Create("idempotency", Guid.NewGuid().ToString("N"));

    private IdempotencyRecord Record(TimeSpan expiresIn, byte[]? body = null) => new()
    {
        Status = IdempotencyStatus.Completed,
        ExpiresAt = time.GetUtcNow() + expiresIn,
        Response = new StoredResponse(201, [], body ?? [1, 2, 3], false, (body ?? [1, 2, 3]).Length),
    };

    private async Task<GrainState<IdempotencyRecord>> ReadAsync(GrainId key)
    {
        var state = new GrainState<IdempotencyRecord>();
        await storage.ReadStateAsync(State, key, state);
        return state;
    }

    /// <summary>
    /// Starts <paramref name="count"/> writes at once, each on a thread of its own held at a barrier until all are
    /// there; returns the numbers of those that landed.
    /// </summary>
    private static async Task<int[]> InParallelAsync(int count, Func<int, Task> write)
    {
        using var start = new Barrier(count);
        var writes = Enumerable.Range(0, count).Select(i => Task.Factory.StartNew(() =>
        {
            start.SignalAndWait();
            try
            {
                write(i).GetAwaiter().GetResult();
                return i;
            }
            catch (InconsistentStateException)
            {
                return -1;
            }
        }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default)).ToArray();
        return (await Task.WhenAll(writes)).Where(i => i >= 0).ToArray();
    }

    [Fact]
    public async Task Create_OfAKeyThatExists_IsRefused_AndTheRecordStays()
    {
        var key = Key();
        await storage.WriteStateAsync(State, key, new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1), [1])));

        await Assert.ThrowsAsync<InconsistentStateException>(() =>
            storage.WriteStateAsync(State, key, new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1), [2]))));

        Assert.Equal([1], (await ReadAsync(key)).State!.Response!.Body);
    }

    [Fact]
    public async Task Update_WithTheStoredETag_Lands_WithAStaleOne_IsRefused()
    {
        var key = Key();
        var first = new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1), [1]));
        await storage.WriteStateAsync(State, key, first);
        var stale = first.ETag;
        first.State = Record(TimeSpan.FromHours(1), [2]);
        await storage.WriteStateAsync(State, key, first);

        var late = new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1), [3])) { ETag = stale };
        await Assert.ThrowsAsync<InconsistentStateException>(() => storage.WriteStateAsync(State, key, late));

        var read = await ReadAsync(key);
        Assert.True(read.RecordExists);
        Assert.Equal(first.ETag, read.ETag);
        Assert.Equal([2], read.State!.Response!.Body);
    }

    [Theory]
    [InlineData("not-a-version")]
    [InlineData("")]
    [InlineData("-1")]
    [InlineData(" 1")]
    [InlineData("01")]
    public async Task UpdateOrClear_WithAnETagThisStoreNeverIssued_IsRefused_AndTheRecordStays(string foreign)
    {
        var key = Key();
        await storage.WriteStateAsync(State, key, new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1), [1])));

        await Assert.ThrowsAsync<InconsistentStateException>(() =>
            storage.WriteStateAsync(State, key, new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1), [2])) { ETag = foreign }));
        await Assert.ThrowsAsync<InconsistentStateException>(() =>
            storage.ClearStateAsync(State, key, new GrainState<IdempotencyRecord> { ETag = foreign }));

        Assert.Equal([1], (await ReadAsync(key)).State!.Response!.Body);
    }

    [Fact]
    public async Task Read_ReturnsACopy_ThatNoWriterOrReaderShares()
    {
        var key = Key();
        var body = new byte[] { 1, 2, 3 };
        await storage.WriteStateAsync(State, key, new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1), body)));
        body[0] = 9;
        (await ReadAsync(key)).State!.Response!.Body[1] = 9;

        Assert.Equal([1, 2, 3], (await ReadAsync(key)).State!.Response!.Body);
    }

    [Fact]
    public async Task ParallelCreatesOfOneKey_ExactlyOneLands_Repeatedly()
    {
        for (var round = 0; round < 50; round++)
        {
            var key = Key();
            var landed = await InParallelAsync(16, i => storage.WriteStateAsync(State, key,
                new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1), [(byte)i]))));

            Assert.Single(landed);
            Assert.Equal([(byte)landed[0]], (await ReadAsync(key)).State!.Response!.Body);
        }
    }

    [Fact]
    public async Task Purge_DropsExpiredRecords_KeepsLiveOnes_AndAHolderOfAPurgedRecordCannotWriteOverIt()
    {
        var expiring = Key();
        var living = Key();
        var holder = new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1)));
        await storage.WriteStateAsync(State, expiring, holder);
        await storage.WriteStateAsync(State, living, new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(3))));

        time.Advance(TimeSpan.FromHours(2));

        Assert.False((await ReadAsync(expiring)).RecordExists);
        Assert.True((await ReadAsync(living)).RecordExists);
        Assert.Equal(1, storage.Count);
        var successor = new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1), [7]));
        await storage.WriteStateAsync(State, expiring, successor);
        await Assert.ThrowsAsync<InconsistentStateException>(() => storage.WriteStateAsync(State, expiring, holder));
        var read = await ReadAsync(expiring);
        Assert.Equal(successor.ETag, read.ETag);
        Assert.Equal([7], read.State!.Response!.Body);
    }

    [Fact]
    public async Task Purge_KeepsAClaimWhoseLeaseOutlastsItsExpiry_UntilTheLeaseEnds()
    {
        var key = Key();
        var claim = new IdempotencyRecord
        {
            Status = IdempotencyStatus.InProgress,
            ExpiresAt = time.GetUtcNow() + TimeSpan.FromHours(1),
            LeaseExpiresAt = time.GetUtcNow() + TimeSpan.FromHours(3),
        };
        await storage.WriteStateAsync(State, key, new GrainState<IdempotencyRecord>(claim));

        time.Advance(TimeSpan.FromHours(2));
        Assert.True((await ReadAsync(key)).RecordExists);

        time.Advance(TimeSpan.FromHours(2));
        Assert.False((await ReadAsync(key)).RecordExists);
    }

    [Fact]
    public async Task StoreAtItsBound_RefusesNewKeys_StillTakesAndReadsThoseItHolds_AndTakesNewOnesOnceRecordsExpire()
    {
        // Bounded at a megabyte: one record of 600 KB fits, a second does not (records that large take segments of
        // their own, so what is held is the records' own bytes).
        using var bounded = new InMemoryRecordStorage(TestSerializer.Storage, time, maxBytes: 1 << 20);
        var large = new byte[600 * 1024];
        var held = Key();
        var state = new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1), large));
        await bounded.WriteStateAsync(State, held, state);

        var refused = await Assert.ThrowsAsync<IOException>(() => bounded.WriteStateAsync(State, Key(), new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1), large))));
        Assert.Contains("ConnectionStrings__Postgres", refused.Message, StringComparison.Ordinal);

        // A key it holds: updated, read, and a create of it refused as the conflict it is (a grain then reads it).
        var updated = new byte[600 * 1024];
        updated[0] = 7;
        state.State = Record(TimeSpan.FromHours(1), updated);
        await bounded.WriteStateAsync(State, held, state);
        var read = new GrainState<IdempotencyRecord>();
        await bounded.ReadStateAsync(State, held, read);
        Assert.Equal(7, read.State!.Response!.Body[0]);
        await Assert.ThrowsAsync<InconsistentStateException>(() => bounded.WriteStateAsync(State, held, new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1)))));

        // Once the held one expires (the minute's purge), its room goes to a new key.
        time.Advance(TimeSpan.FromHours(2));
        await bounded.WriteStateAsync(State, Key(), new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1), large)));

        // A free key's record (a release's, kept for a lease) is let in at the bound: refused, the release would be
        // retried for a day. A claim is not.
        using var full = new InMemoryRecordStorage(TestSerializer.Storage, time, maxBytes: 1);
        await full.WriteStateAsync(State, Key(), new GrainState<IdempotencyRecord>(new IdempotencyRecord { ExpiresAt = time.GetUtcNow() + TimeSpan.FromMinutes(1) }));
        var claim = new IdempotencyRecord { Status = IdempotencyStatus.InProgress, Fingerprint = [1], LeaseExpiresAt = time.GetUtcNow() + TimeSpan.FromMinutes(1), ExpiresAt = time.GetUtcNow() + TimeSpan.FromHours(1) };
        await Assert.ThrowsAsync<IOException>(() => full.WriteStateAsync(State, Key(), new GrainState<IdempotencyRecord>(claim)));
    }

    [Fact]
    public async Task ClaimsNeverCompleted_PinningMostlyDeadSegments_AreMovedOutOnceANewKeyFindsThemPastTheirBound()
    {
        var table = new RecordTable(key => System.IO.Hashing.XxHash3.HashToUInt64(key));
        // Segments held to 4 × 256 KiB + the three every store has: 4 MiB.
        using var store = new InMemoryRecordStorage(TestSerializer.Storage, time, 256 * 1024, null, table);
        var claim = new byte[2_000];
        // About 520 claims to a segment; all but every 400th completed (gone from it): each segment keeps one or two.
        var pinned = AddClaims(table, 3_200, claim, keepEvery: 400);

        Assert.True(table.SegmentBytes > 6L * RecordSegments.SegmentSize, $"{table.SegmentBytes} bytes of segments");
        Assert.True(table.LiveBytes < 32 * 1024);

        // Taken at once; the records move out beside it, off the grain's turn.
        await store.WriteStateAsync(State, Key(), new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1))));

        await SegmentsShrinkToAsync(table, 4L * RecordSegments.SegmentSize);

        Assert.Equal(pinned.Count + 1, table.Count);
        foreach (var (i, version) in pinned)
        {
            Assert.True(table.TryRead(BitConverter.GetBytes(i), out var read, out var readVersion));
            Assert.Equal(claim, read);
            Assert.Equal(version, readVersion);
        }

        // The minute's purge still runs after it: the new key's record, expired by then, is dropped.
        time.Advance(TimeSpan.FromHours(2));
        Assert.Equal(pinned.Count, table.Count);
    }

    [Fact]
    public async Task CompactionStartedByANewKey_IsNotRunInThatWrite()
    {
        // A scan of millions of records in the write would hold the grain's turn (and the request) for as long.
        var writing = false;
        var writer = Environment.CurrentManagedThreadId;
        var allocatedInTheWrite = 0;
        var allocatedAfter = 0;
        var table = SparseClaims(out var pinned, size =>
        {
            if (Volatile.Read(ref writing) && Environment.CurrentManagedThreadId == writer)
            {
                Interlocked.Increment(ref allocatedInTheWrite);
            }
            else
            {
                Interlocked.Increment(ref allocatedAfter);
            }

            return new byte[size];
        });
        using var store = new InMemoryRecordStorage(TestSerializer.Storage, time, 2_200_000, null, table);
        var before = Volatile.Read(ref allocatedAfter);

        // Called on this thread, before anything is awaited.
        Volatile.Write(ref writing, true);
        var write = store.WriteStateAsync(State, Key(), new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1))));
        Volatile.Write(ref writing, false);

        Assert.True(write.IsCompletedSuccessfully);
        Assert.Equal(0, allocatedInTheWrite);
        await SegmentsShrinkToAsync(table, 8L * RecordSegments.SegmentSize);

        // The moved claims filled segments of their own, elsewhere.
        Assert.True(Volatile.Read(ref allocatedAfter) > before);
        Assert.Equal(pinned.Count + 5, table.Count);
        Assert.All(pinned, p => Assert.True(table.TryRead(BitConverter.GetBytes(p.Key), out _, out var version) && version == p.Value));
    }

    [Fact]
    public async Task ABoundTooLargeToScale_NeverStartsACompaction()
    {
        // Four times the bound would overflow: taken as no bound on the segments, not as a negative one that every
        // new key is past.
        var table = SparseClaims(out _);
        using var store = new InMemoryRecordStorage(TestSerializer.Storage, time, long.MaxValue, null, table);
        var segments = table.SegmentBytes;

        await store.WriteStateAsync(State, Key(), new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1))));
        await Task.Delay(500);

        Assert.Equal(segments, table.SegmentBytes);
    }

    /// <summary>
    /// A table of twenty segments of claims of 50 KB, one in twenty of them never completed (about 20 MiB of segments
    /// holding 1 MB), and a segment of completed records with room for a small new one, not for a claim moved out.
    /// </summary>
    private static RecordTable SparseClaims(out Dictionary<int, long> pinned, Func<int, byte[]>? allocate = null)
    {
        var table = new RecordTable(key => System.IO.Hashing.XxHash3.HashToUInt64(key), allocate);
        for (byte i = 0; i < 4; i++)
        {
            Assert.True(table.TryAdd([0xFF, i], new byte[250_000], long.MaxValue, false, out _));
        }

        pinned = AddClaims(table, 400, new byte[50_000], keepEvery: 20);
        Assert.True(table.SegmentBytes > 18L * RecordSegments.SegmentSize, $"{table.SegmentBytes} bytes of segments");
        return table;
    }

    /// <summary>Adds <paramref name="count"/> claims and completes (removes) all but every <paramref name="keepEvery"/>th: the versions of those kept.</summary>
    private static Dictionary<int, long> AddClaims(RecordTable table, int count, byte[] claim, int keepEvery)
    {
        var pinned = new Dictionary<int, long>();
        for (var i = 0; i < count; i++)
        {
            Assert.True(table.TryAdd(BitConverter.GetBytes(i), claim, long.MaxValue, true, out var version));
            if (i % keepEvery == 0)
            {
                pinned[i] = version;
            }
            else
            {
                Assert.True(table.TryRemove(BitConverter.GetBytes(i), version));
            }
        }

        return pinned;
    }

    /// <summary>Waits (at most 10 s) until the compaction started off the write has held the segments to <paramref name="bytes"/>.</summary>
    private static async Task SegmentsShrinkToAsync(RecordTable table, long bytes)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        while (table.SegmentBytes > bytes)
        {
            Assert.True(DateTime.UtcNow < deadline, $"{table.SegmentBytes} bytes of segments left");
            await Task.Delay(10);
        }
    }

    [Fact]
    public async Task Read_OfAKeyNeverWritten_IsAbsent_WithAFreshState()
    {
        var read = await ReadAsync(Key());

        Assert.False(read.RecordExists);
        Assert.Null(read.ETag);
        Assert.Equal(IdempotencyStatus.None, read.State!.Status);
    }

    [Fact]
    public async Task ParallelUpdatesFromOneVersion_ExactlyOneLands_Repeatedly()
    {
        for (var round = 0; round < 50; round++)
        {
            var key = Key();
            var first = new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1)));
            await storage.WriteStateAsync(State, key, first);
            var landed = await InParallelAsync(16, i => storage.WriteStateAsync(State, key,
                new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1), [(byte)i])) { ETag = first.ETag }));

            Assert.Single(landed);
            Assert.Equal([(byte)landed[0]], (await ReadAsync(key)).State!.Response!.Body);
        }
    }

    [Fact]
    public async Task PurgeRacingARewrite_NeverDropsTheRewrittenRecord()
    {
        for (var round = 0; round < 5_000; round++)
        {
            var key = Key();
            // Expired when written; the clock stands still, so only the explicit purge below runs.
            var state = new GrainState<IdempotencyRecord>(Record(-TimeSpan.FromSeconds(1)));
            await storage.WriteStateAsync(State, key, state);
            state.State = Record(TimeSpan.FromHours(1), [5]);
            using var start = new ManualResetEventSlim();
            var purge = Task.Run(() => { start.Wait(); storage.Purge(); });
            var rewrite = Task.Run(async () =>
            {
                start.Wait();
                try
                {
                    await storage.WriteStateAsync(State, key, state);
                    return true;
                }
                catch (InconsistentStateException)
                {
                    return false;
                }
            });
            start.Set();
            await purge;

            // Either the purge came first (the rewrite is refused) or the rewrite did (and it stays).
            Assert.Equal(await rewrite, (await ReadAsync(key)).RecordExists);
        }
    }

    [Fact]
    public async Task Clear_WithTheStoredETag_Removes_WithAStaleOne_IsRefused()
    {
        var key = Key();
        var state = new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1)));
        await storage.WriteStateAsync(State, key, state);
        var stale = new GrainState<IdempotencyRecord>(state.State) { ETag = "stale" };

        await Assert.ThrowsAsync<InconsistentStateException>(() => storage.ClearStateAsync(State, key, stale));
        await storage.ClearStateAsync(State, key, state);

        Assert.False((await ReadAsync(key)).RecordExists);
        Assert.Null(state.ETag);
    }

    [Fact]
    public async Task AKeyLongerThanTheStackBuffer_IsWrittenReadUpdatedAndCleared()
    {
        var key = GrainId.Create("idempotency", new string('k', 2_000));
        var state = new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1), [1]));
        await storage.WriteStateAsync(State, key, state);
        state.State = Record(TimeSpan.FromHours(1), [2]);
        await storage.WriteStateAsync(State, key, state);

        Assert.Equal([2], (await ReadAsync(key)).State!.Response!.Body);
        Assert.False((await ReadAsync(GrainId.Create("idempotency", new string('k', 1_999)))).RecordExists);
        await storage.ClearStateAsync(State, key, state);
        Assert.False((await ReadAsync(key)).RecordExists);
    }

    [Fact]
    public async Task RecordsOfEverySize_ReadBackWhole_WhateverWasWrittenBeforeThem()
    {
        // Each write serializes into a buffer reused by its thread: a small record after a large one must not
        // carry the large one's tail, and a record past the buffer's kept size is whole too.
        var sizes = new[] { 3, 200_000, 10, 70_000, 0, 1_000_000, 5 };
        var keys = sizes.Select(_ => Key()).ToArray();
        var bodies = sizes.Select(size => Enumerable.Range(0, size).Select(i => (byte)(i * 7)).ToArray()).ToArray();
        for (var i = 0; i < sizes.Length; i++)
        {
            await storage.WriteStateAsync(State, keys[i], new GrainState<IdempotencyRecord>(Record(TimeSpan.FromHours(1), bodies[i])));
        }

        for (var i = 0; i < sizes.Length; i++)
        {
            Assert.Equal(bodies[i], (await ReadAsync(keys[i])).State!.Response!.Body);
        }
    }

    [Fact]
    public void ScheduledPurgeThatFails_IsReported_AndTriedAgainAtTheNextInterval()
    {
        // Purging moves the records left in a mostly dead segment into a new one, which may not be had: thrown from
        // its timer, the failure ended the process and every record with it.
        var outOfMemory = false;
        var segments = 0;
        var table = new RecordTable(key => key[^1] * 0x9E37_79B9_7F4A_7C15UL, size =>
        {
            if (outOfMemory)
            {
                throw new InsufficientMemoryException();
            }

            segments++;
            return new byte[size];
        });
        var log = new FakeLogger<InMemoryRecordStorage>();
        using var store = new InMemoryRecordStorage(TestSerializer.Storage, time, null, log, table);
        var payload = new byte[250_000];
        var versions = new long[8];
        for (var i = 0; i < versions.Length; i++)
        {
            // Four to a segment: the first four fill one, the next four another.
            Assert.True(table.TryAdd([(byte)i], payload, long.MaxValue, false, out versions[i]));
        }

        for (var i = 0; i < 3; i++)
        {
            Assert.True(table.TryRemove([(byte)i], versions[i]));
        }

        outOfMemory = true;
        time.Advance(InMemoryRecordStorage.PurgeInterval);

        Assert.Single(log.Collector.GetSnapshot(), r => r.Level == LogLevel.Error);
        Assert.True(table.TryRead([3], out var kept, out var version));
        Assert.Equal(payload, kept);
        Assert.Equal(versions[3], version);

        outOfMemory = false;
        var segmentsBefore = segments;
        time.Advance(InMemoryRecordStorage.PurgeInterval);
        Assert.Single(log.Collector.GetSnapshot(), r => r.Level == LogLevel.Error);
        Assert.Equal(5, table.Count);
        // Tried again: the record left in the mostly dead segment moved to a new one.
        Assert.True(segments > segmentsBefore, "The purge after the failed one did not run.");
        Assert.True(table.TryRead([3], out kept, out _));
        Assert.Equal(payload, kept);
    }
}
