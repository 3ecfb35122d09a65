using System.Buffers;
using System.Security.Cryptography;
using System.Text;
using OrleansIdempotency.Once;

namespace OrleansIdempotency.Api.Tests.Once;

/// <summary>What a Once claim holds of its input while it reads and hashes it.</summary>
public sealed class OnceInputTests
{
    [Theory]
    [InlineData(1364)]
    [InlineData(1365)]
    [InlineData(2047)]
    [InlineData(2048)]
    [InlineData(100_000)]
    public void Fingerprint_OfALargeInput_IsTheSha256OfItsUtf8_WhereverASurrogatePairFallsBetweenPieces(int pairAt)
    {
        // Pieces of 4,096 bytes: a four-byte character (a surrogate pair) at each offset around their edges.
        var input = new string('a', pairAt) + "\U0001F600" + new string('é', 3000) + "\U0001F600";

        Assert.Equal(SHA256.HashData(Encoding.UTF8.GetBytes(input)), OnceExecutor.Fingerprint(input));
    }

    [Fact]
    public void Fingerprint_OfALargeInput_DoesNotEncodeItWholeAgain()
    {
        var input = new string('x', 4 * 1024 * 1024);
        OnceExecutor.Fingerprint("warm up " + new string('y', 10_000));

        var before = GC.GetAllocatedBytesForCurrentThread();
        OnceExecutor.Fingerprint(input);

        Assert.InRange(GC.GetAllocatedBytesForCurrentThread() - before, 0, 64 * 1024);
    }

    [Fact]
    public async Task Body_IsReadInPiecesHoldingItOnce_NotInABufferThatCopiesItselfAsItDoubles()
    {
        var bytes = RandomNumberGenerator.GetBytes((4 * 1024 * 1024) + 1);

        // Over a memory stream every read completes at once: the whole read runs on this thread.
        var before = GC.GetAllocatedBytesForCurrentThread();
        using var body = await PooledBody.ReadAsync(new MemoryStream(bytes, writable: false), bytes.Length, CancellationToken.None);
        var allocated = GC.GetAllocatedBytesForCurrentThread() - before;

        Assert.Equal(bytes, body!.ToSequence().ToArray());
        Assert.InRange(allocated, 0, bytes.Length + (256 * 1024));
        Assert.Null(await PooledBody.ReadAsync(new MemoryStream(bytes, writable: false), bytes.Length - 1, CancellationToken.None));
    }
}
