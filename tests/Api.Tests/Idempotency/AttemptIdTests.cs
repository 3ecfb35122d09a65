using System.Collections.Concurrent;

namespace OrleansIdempotency.AspNetCore.Tests;

public sealed class AttemptIdTests
{
    [Fact]
    public void Ids_NeverRepeat_AcrossThreadsAndRefills()
    {
        // Eight threads, each through about 390 refills of its batch of 256.
        const int Threads = 8;
        const int PerThread = 100_000;
        var ids = new ConcurrentBag<Guid[]>();
        Parallel.For(0, Threads, new ParallelOptions { MaxDegreeOfParallelism = Threads }, _ =>
            ids.Add(Enumerable.Range(0, PerThread).Select(_ => AttemptId.New()).ToArray()));

        var distinct = new HashSet<Guid>(ids.SelectMany(batch => batch));

        Assert.Equal(Threads * PerThread, distinct.Count);
        Assert.DoesNotContain(Guid.Empty, distinct);
    }

    [Fact]
    public void Ids_HaveNoBytePinned_AcrossARefill()
    {
        // Random bits: over 1,000 ids (four refills) no byte position keeps one value.
        var ids = Enumerable.Range(0, 1_000).Select(_ => AttemptId.New().ToByteArray()).ToArray();

        for (var position = 0; position < 16; position++)
        {
            Assert.True(ids.Select(id => id[position]).Distinct().Count() > 100, $"byte {position} barely varies");
        }
    }
}
