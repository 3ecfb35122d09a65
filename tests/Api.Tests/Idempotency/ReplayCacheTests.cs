using Microsoft.Extensions.Options;
using Microsoft.Extensions.Time.Testing;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore.Tests;

public sealed class ReplayCacheTests
{
    private static readonly DateTimeOffset Now = new(2026, 1, 1, 0, 0, 0, TimeSpan.Zero);
    private static readonly byte[] Fingerprint = [1, 2, 3];
    private readonly FakeTimeProvider time = new(Now);

    private ReplayCache Cache(long bytes = 1024 * 1024) => new(Options.Create(new IdempotencyOptions { ReplayCacheBytes = bytes }), time);

    private static IdempotencyKey Key(int i) => new("user:alice", "k" + i);

    private static ClaimResult Completed(int bodyBytes = 10, bool omitted = false, TimeSpan? retention = null) => new(
        ClaimOutcome.Completed,
        Response: new StoredResponse(201, [new("Content-Type", "application/json")], new byte[omitted ? 0 : bodyBytes], omitted, bodyBytes),
        ExpiresAt: Now + (retention ?? TimeSpan.FromHours(1)));

    [Fact]
    public void CompletedAnswer_IsFoundForTheSameRequestOnly()
    {
        var cache = Cache();
        var completed = Completed();

        cache.Add(Key(1), Fingerprint, completed);

        Assert.Same(completed.Response, cache.Find(Key(1), [1, 2, 3]));
        Assert.Null(cache.Find(Key(1), [1, 2, 4]));
        Assert.Null(cache.Find(Key(2), Fingerprint));
        Assert.Null(cache.Find(new IdempotencyKey("user:bob", "k1"), Fingerprint));
    }

    [Fact]
    public void Entry_EndsSecondsBeforeTheRecordsRetentionEnds()
    {
        var cache = Cache();
        cache.Add(Key(1), Fingerprint, Completed(retention: TimeSpan.FromMinutes(5)));

        // A few seconds early: the silo's clock, which set the expiry, may be ahead of this process's.
        time.Advance(TimeSpan.FromMinutes(5) - TimeSpan.FromSeconds(6));
        Assert.NotNull(cache.Find(Key(1), Fingerprint));
        time.Advance(TimeSpan.FromSeconds(1));
        Assert.Null(cache.Find(Key(1), Fingerprint));
    }

    [Fact]
    public void Entry_EndsByWhatTheGrainSaidWasLeft_WhenThisProcesssClockIsBehindTheSilos()
    {
        // The silo's clock 8 s ahead of this process's: its expiry, read here, lies 8 s later than the record's end.
        var cache = Cache();
        var retention = TimeSpan.FromMinutes(5);
        cache.Add(Key(1), Fingerprint, Completed(retention: retention + TimeSpan.FromSeconds(8)) with { RetainedFor = retention });

        time.Advance(retention - TimeSpan.FromSeconds(6));
        Assert.NotNull(cache.Find(Key(1), Fingerprint));
        time.Advance(TimeSpan.FromSeconds(1));
        Assert.Null(cache.Find(Key(1), Fingerprint));
    }

    [Fact]
    public void OnlyCompletedAnswersWithTheirBody_AreKept()
    {
        var cache = Cache();

        cache.Add(Key(1), Fingerprint, Completed(omitted: true));
        cache.Add(Key(2), Fingerprint, new ClaimResult(ClaimOutcome.InProgress, LeaseExpiresAt: Now.AddSeconds(30)));
        cache.Add(Key(3), Fingerprint, Completed() with { ExpiresAt = null });

        Assert.Null(cache.Find(Key(1), Fingerprint));
        Assert.Null(cache.Find(Key(2), Fingerprint));
        Assert.Null(cache.Find(Key(3), Fingerprint));
        Assert.Equal(0, cache.Bytes);
    }

    [Fact]
    public void Budget_PushesOutTheOldestFirst_AndIsNeverExceeded()
    {
        const long Budget = 64 * 1024;
        var cache = Cache(Budget);

        for (var i = 0; i < 1000; i++)
        {
            cache.Add(Key(i), Fingerprint, Completed(bodyBytes: 1000));
            Assert.InRange(cache.Bytes, 1, Budget);
        }

        Assert.Null(cache.Find(Key(0), Fingerprint));
        Assert.NotNull(cache.Find(Key(999), Fingerprint));
    }

    [Fact]
    public void ExpiredEntries_StillCountUntilPushedOut_SoMemoryStaysWithinTheBudget()
    {
        const long Budget = 64 * 1024;
        var cache = Cache(Budget);
        for (var round = 0; round < 20; round++)
        {
            for (var i = 0; i < 100; i++)
            {
                cache.Add(Key((round * 100) + i), Fingerprint, Completed(bodyBytes: 1000, retention: TimeSpan.FromSeconds(10) + (time.GetUtcNow() - Now)));
                Assert.NotNull(cache.Find(Key((round * 100) + i), Fingerprint));
            }

            time.Advance(TimeSpan.FromSeconds(20));
            Assert.InRange(cache.Bytes, 1, Budget);
        }
    }

    [Fact]
    public void ResponseLargerThanASixteenthOfTheBudget_IsLeftToTheGrain()
    {
        var cache = Cache(16 * 1024);

        cache.Add(Key(1), Fingerprint, Completed(bodyBytes: 2000));

        Assert.Null(cache.Find(Key(1), Fingerprint));
    }

    [Fact]
    public void ZeroBudget_KeepsNothing()
    {
        var cache = Cache(0);

        cache.Add(Key(1), Fingerprint, Completed());

        Assert.Null(cache.Find(Key(1), Fingerprint));
    }

    [Fact]
    public async Task ConcurrentAddsAndFinds_KeepTheCountWithinTheBudget()
    {
        const long Budget = 32 * 1024;
        var cache = Cache(Budget);

        await Task.WhenAll(Enumerable.Range(0, 8).Select(t => Task.Run(() =>
        {
            for (var i = 0; i < 5000; i++)
            {
                var key = Key(i % 300);
                if (cache.Find(key, Fingerprint) is null)
                {
                    cache.Add(key, Fingerprint, Completed(bodyBytes: 500));
                }
            }
        })));

        Assert.InRange(cache.Bytes, 1, Budget);
    }
}
