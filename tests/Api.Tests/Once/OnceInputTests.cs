using System.Buffers;
using System.Security.Cryptography;
using System.Text;
using OrleansIdempotency.Once;

namespace OrleansIdempotency.Api.Tests.Once;

/// <summary>What a Once claim holds of its input while it reads and hashes it.</summary>
public sealed class OnceInputTests
{
    [Theory]
    [InlineData(4091)]
    [InlineData(4092)]
    [InlineData(4093)]
    [InlineData(4094)]
    [InlineData(4095)]
    [InlineData(4096)]
    public void Fingerprint_OfALargeInput_IsTheSha256OfItsUtf8_WhereverASurrogatePairFallsBetweenPieces(int pairAt)
    {
        // Pieces of up to 4,096 bytes: a four-byte character (a surrogate pair) starting at each byte around the first
        // piece's end (one-byte characters before it), and another 4,096 bytes on (two-byte characters between them).
        var input = new string('a', pairAt) + "\U0001F600" + new string('é', 2046) + "\U0001F600" + new string('é', 5000);

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
