from lit_ar.cli import main

if __name__ == "__main__":
    main()
