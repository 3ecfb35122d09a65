using System.Buffers;

namespace OrleansIdempotency.Once;

/// <summary>
/// A request body read whole into pooled pieces: neither a contiguous buffer that copies itself each time it doubles
/// (a 10 MiB body held 16 MiB and passed through twice that), nor one the size a client announces before it sends it.
/// </summary>
internal sealed class PooledBody : IDisposable
{
    private const int PieceBytes = 64 * 1024;

    private readonly List<byte[]> pieces = [];
    private int lastPieceLength;

    /// <summary>The bytes read.</summary>
    public long Length { get; private set; }

    /// <summary>Reads <paramref name="body"/> to its end; null, read no further, once it passes <paramref name="maxBytes"/>.</summary>
    public static async Task<PooledBody?> ReadAsync(Stream body, long maxBytes, CancellationToken cancellationToken)
    {
        var read = new PooledBody();
        try
        {
            while (true)
            {
                if (read.pieces.Count == 0 || read.lastPieceLength == PieceBytes)
                {
                    read.pieces.Add(ArrayPool<byte>.Shared.Rent(PieceBytes));
                    read.lastPieceLength = 0;
                }

                // No more than one byte past the bound: enough to know the body passes it.
                var room = (int)Math.Min(PieceBytes - read.lastPieceLength, maxBytes - read.Length + 1);
                var count = await body.ReadAsync(read.pieces[^1].AsMemory(read.lastPieceLength, room), cancellationToken);
                if (count == 0)
                {
                    return read;
                }

                read.lastPieceLength += count;
                read.Length += count;
                if (read.Length > maxBytes)
                {
                    read.Dispose();
                    return null;
                }
            }
        }
        catch
        {
            read.Dispose();
            throw;
        }
    }

    /// <summary>The bytes, valid until this is disposed.</summary>
    /// <remarks>
    /// Without an empty last segment (the piece rented to find a body that filled its pieces had ended): the JSON
    /// reader takes a segment followed by one as not the last, and fails with an IndexOutOfRangeException, not a
    /// JsonException, on a literal cut off at its end.
    /// </remarks>
    public ReadOnlySequence<byte> ToSequence()
    {
        var count = pieces.Count > 1 && lastPieceLength == 0 ? pieces.Count - 1 : pieces.Count;
        var lastLength = count < pieces.Count ? PieceBytes : lastPieceLength;
        if (count == 1)
        {
            return new ReadOnlySequence<byte>(pieces[0], 0, lastLength);
        }

        var first = new Piece(pieces[0].AsMemory(0, PieceBytes), 0);
        var last = first;
        for (var i = 1; i < count; i++)
        {
            last = last.Append(pieces[i].AsMemory(0, i == count - 1 ? lastLength : PieceBytes));
        }

        return new ReadOnlySequence<byte>(first, 0, last, last.Memory.Length);
    }

    public void Dispose()
    {
        foreach (var piece in pieces)
        {
            ArrayPool<byte>.Shared.Return(piece);
        }

        pieces.Clear();
    }

    private sealed class Piece : ReadOnlySequenceSegment<byte>
    {
        public Piece(ReadOnlyMemory<byte> memory, long runningIndex)
        {
            Memory = memory;
            RunningIndex = runningIndex;
        }

        public Piece Append(ReadOnlyMemory<byte> memory)
        {
            var next = new Piece(memory, RunningIndex + Memory.Length);
            Next = next;
            return next;
        }
    }
}
